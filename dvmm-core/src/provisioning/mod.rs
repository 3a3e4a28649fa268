//! The application service: request commands (submit, approve, reject,
//! cancel) and the provisioning flow, generic over the ports.
//!
//! Every command loads the aggregate, decides, appends with the expected
//! version and records the matching timeline entries. Optimistic-concurrency
//! conflicts are retried by reloading and deciding again.
//!
//! Provisioning is crash-safe: the request stream records which
//! [`VmId`](crate::VmId) is being built before vSphere is called, the VM
//! carries that id, and a rerun of [`ProvisioningService::provision`] for a
//! request left in `Provisioning` adopts the VM it finds (through
//! [`VspherePort::find_vm`] and the port's idempotent `create_vm`) instead of
//! cloning a second one. Timeline entries are keyed by the event they come
//! from, so a rerun fills in whatever a crash left out without writing
//! anything twice.
//!
//! The service is one type; its parts live in files of one concern each:
//! `commands` (submit, approve, reject, cancel, refresh), `lifecycle`
//! (cleanup after a failure, retry, decommission, status sync), `queries`, `flow`
//! (provisioning, resume, reconcile), `claims` (one provisioner per
//! request), `aggregates` (load, decide, append with conflict retries),
//! `timeline_projection`, `user_messages`, `tenants` and `error`.

use std::fmt;
use std::sync::Arc;

use crate::clock::{Clock, IdGenerator};
use crate::config::TenantConfig;
use crate::ids::TenantId;
use crate::ports::{EventStore, TimelineSink, VspherePort};

mod aggregates;
mod claims;
mod commands;
mod error;
mod flow;
mod lifecycle;
mod queries;
mod tenants;
mod timeline_projection;
mod user_messages;

use claims::ClaimSource;

pub use aggregates::{request_stream, vm_stream};
pub use commands::NewVmRequest;
pub use error::ServiceError;
pub use flow::{ABANDONED, ProvisionOutcome};
pub use lifecycle::{
    CleanupOutcome, DecommissionOutcome, GUEST_SHUTDOWN_GRACE, PARTIAL_REMOVED_DETAILS,
};
pub use tenants::Tenants;
pub use timeline_projection::timeline_entry_for;
pub use user_messages::user_message;

/// The request and VM service, generic over the ports.
///
/// ```
/// # use dvmm_core::provisioning::*;
/// # fn demo<S, V, T>(service: ProvisioningService<S, V, T>)
/// # where S: dvmm_core::EventStore, V: dvmm_core::VspherePort, T: dvmm_core::TimelineSink {}
/// ```
pub struct ProvisioningService<S, V, T, C = crate::clock::SystemClock, I = crate::clock::RandomIds>
{
    store: S,
    vsphere: V,
    timeline: T,
    clock: C,
    ids: I,
    tenants: Tenants,
    claims: ClaimSource,
    holder: String,
    read_model: Option<Arc<dyn crate::read_model::RequestReadModel>>,
}

impl<S, V, T, C, I> fmt::Debug for ProvisioningService<S, V, T, C, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningService")
            .field("tenants", &self.tenants.by_id.len())
            .field("holder", &self.holder)
            .field(
                "claims",
                &match self.claims {
                    ClaimSource::Process(_) => "in-process",
                    ClaimSource::Shared { .. } => "shared",
                },
            )
            .finish_non_exhaustive()
    }
}

impl<S, V, T> ProvisioningService<S, V, T>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
{
    /// A service on the system clock and random ids.
    pub fn new(store: S, vsphere: V, timeline: T, tenants: Tenants) -> Self {
        Self::with_clock_and_ids(
            store,
            vsphere,
            timeline,
            tenants,
            crate::clock::SystemClock,
            crate::clock::RandomIds,
        )
    }
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// A service with an explicit clock and id generator (for deterministic tests).
    pub fn with_clock_and_ids(
        store: S,
        vsphere: V,
        timeline: T,
        tenants: Tenants,
        clock: C,
        ids: I,
    ) -> Self {
        Self {
            store,
            vsphere,
            timeline,
            clock,
            ids,
            tenants,
            claims: ClaimSource::Process(Arc::default()),
            holder: format!("dvmm process {}", std::process::id()),
            read_model: None,
        }
    }

    /// Keeps `read_model` up to date with every request change, like the
    /// timeline, and serves [`ProvisioningService::list_requests`] and
    /// [`ProvisioningService::list_requests_page`] from it instead of
    /// replaying the tenant's events. Fill it for existing data with
    /// [`ProvisioningService::rebuild_read_model`].
    pub fn with_read_model(
        mut self,
        read_model: impl crate::read_model::RequestReadModel + 'static,
    ) -> Self {
        self.read_model = Some(Arc::new(read_model));
        self
    }

    /// The name this service's direct calls hold claims under (shown to
    /// callers that find a request claimed). Defaults to the process id.
    pub fn with_holder_name(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// The name this service's direct calls hold claims under.
    pub fn holder_name(&self) -> &str {
        &self.holder
    }

    /// The event store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The vSphere port.
    pub fn vsphere(&self) -> &V {
        &self.vsphere
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The timeline sink.
    pub fn timeline_sink(&self) -> &T {
        &self.timeline
    }

    /// The registered tenants.
    pub fn tenants(&self) -> &Tenants {
        &self.tenants
    }

    fn tenant(&self, tenant: TenantId) -> Result<&Arc<TenantConfig>, ServiceError> {
        self.tenants
            .get(tenant)
            .ok_or(ServiceError::UnknownTenant(tenant))
    }
}
