//! The application service: request commands (submit, approve, reject,
//! cancel) and the provisioning flow, generic over the ports.
//!
//! Every command loads the aggregate, decides, appends with the expected
//! version and records the matching timeline entries. Optimistic-concurrency
//! conflicts are retried by reloading and deciding again.
//!
//! Provisioning is crash-safe: the request stream records which [`VmId`] is
//! being built before vSphere is called, the VM carries that id, and a rerun
//! of [`ProvisioningService::provision`] for a request left in `Provisioning`
//! adopts the VM it finds (through [`VspherePort::find_vm`] and the port's
//! idempotent `create_vm`) instead of cloning a second one. Timeline entries
//! are keyed by the event they come from, so a rerun fills in whatever a crash
//! left out without writing anything twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use tracing::{Instrument, debug, info, info_span, warn};

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::config::{ConfigError, TenantConfig, endpoint_key};
use crate::error::DomainError;
use crate::event::{DomainEvent, EventDecodeError, EventMetadata, NewEvent, StreamId};
use crate::ids::{CorrelationId, EventId, ProjectId, TenantId, UserId, VmId, VmRequestId};
use crate::ports::{
    ClaimAttempt, EventStore, RequestClaims, StoreError, TimelineSink, VsphereError, VspherePort,
};
use crate::runner::Timer;
use crate::spec::{VmProvisioningResult, VmSize, VmSpec};
use crate::timeline::{TimelineEntry, TimelineEntryType};
use crate::vm::{Vm, VmCommand, VmEvent, VmProvisioningStarted, VmStatus};
use crate::vm_request::{
    SubmitVmRequest, VmRequest, VmRequestCommand, VmRequestEvent, VmRequestStatus,
};

/// The error code of a provisioning given up by [`ProvisioningService::abandon`].
pub const ABANDONED: &str = "Abandoned";

/// How often a command is retried after optimistic-concurrency conflicts
/// before giving up with [`ServiceError::TooManyConflicts`].
const MAX_CONFLICT_RETRIES: usize = 16;

/// A service command failed. Nothing half-done is left behind: each append is
/// atomic and a rerun finishes what a failed call started.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The aggregate refused the command.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The request does not exist (for this tenant).
    #[error("VM request {0} was not found")]
    RequestNotFound(VmRequestId),
    /// The VM does not exist (for this tenant).
    #[error("VM {0} was not found")]
    VmNotFound(VmId),
    /// No configuration is registered for the tenant.
    #[error("no configuration is registered for tenant {0}")]
    UnknownTenant(TenantId),
    /// The VM has no vSphere id yet (it is still being provisioned or failed).
    #[error("VM {vm_id} is {status}; it has no vSphere VM to read yet")]
    VmNotProvisioned {
        /// The VM.
        vm_id: VmId,
        /// Its status.
        status: VmStatus,
    },
    /// A persistence port failed.
    #[error("failed to persist: {0}")]
    Store(#[from] StoreError),
    /// A stored event could not be read.
    #[error("failed to read a stored event: {0}")]
    Decode(#[from] EventDecodeError),
    /// vSphere failed outside of provisioning (e.g. refreshing guest info).
    #[error("vSphere call failed: {0}")]
    Vsphere(#[from] VsphereError),
    /// The VM's provisioning started on a vCenter that the tenant's
    /// configuration no longer names, so there are no credentials to finish
    /// it with. Nothing is recorded: once that vCenter is configured again,
    /// a rerun resumes.
    #[error(
        "VM {vm_id} is being built on a vCenter that this tenant's configuration no longer names; configure that vCenter again to finish it"
    )]
    RecordedVcenterNotConfigured {
        /// The VM.
        vm_id: VmId,
    },
    /// Other writers kept changing the stream.
    #[error("gave up on {stream} after {MAX_CONFLICT_RETRIES} concurrent-modification retries")]
    TooManyConflicts {
        /// The contended stream.
        stream: StreamId,
    },
    /// The caller's claim on the request lapsed or was taken over while it
    /// worked, so it stopped before calling vSphere again; whoever holds the
    /// claim now carries on.
    #[error(
        "{holder} lost its claim on request {request_id}; it stopped before calling vSphere again"
    )]
    ClaimLost {
        /// The request.
        request_id: VmRequestId,
        /// Who had the claim.
        holder: String,
    },
}

/// Tenant configurations the service knows, by tenant id.
#[derive(Clone, Debug, Default)]
pub struct Tenants {
    by_id: HashMap<TenantId, Arc<TenantConfig>>,
}

impl Tenants {
    /// No tenants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tenant's configuration, once it is valid.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad field (see
    /// [`TenantConfig::validate`]); nothing is added then.
    pub fn with(mut self, config: TenantConfig) -> Result<Self, ConfigError> {
        self.insert(config)?;
        Ok(self)
    }

    /// Adds (or replaces) a tenant's configuration, once it is valid: a
    /// configuration built in code has not been through the checks that
    /// loading one from a file applies.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad field; nothing is added then.
    pub fn insert(&mut self, config: TenantConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.by_id.insert(config.tenant_id, Arc::new(config));
        Ok(())
    }

    /// Every registered tenant id.
    pub fn ids(&self) -> impl Iterator<Item = TenantId> + '_ {
        self.by_id.keys().copied()
    }

    /// A tenant's configuration.
    pub fn get(&self, tenant: TenantId) -> Option<&Arc<TenantConfig>> {
        self.by_id.get(&tenant)
    }
}

/// A new request, as a host receives it from its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVmRequest {
    /// Tenant.
    pub tenant_id: TenantId,
    /// Project.
    pub project_id: ProjectId,
    /// The project's prefix (first part of the VM name, and its folder).
    pub project_prefix: String,
    /// The name the user asks for.
    pub requested_name: String,
    /// Size (resolved through the tenant's size table).
    pub size: VmSize,
    /// Who asks.
    pub requested_by: UserId,
    /// Why.
    pub justification: String,
}

/// What [`ProvisioningService::provision`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionOutcome {
    /// The VM is ready (possibly without an IP yet: see the warning).
    Ready {
        /// dvmm's VM.
        vm_id: VmId,
        /// What vSphere reported.
        result: VmProvisioningResult,
    },
    /// Provisioning failed; the failure is recorded on both streams and the
    /// timeline.
    Failed {
        /// dvmm's VM.
        vm_id: VmId,
        /// Why.
        error: VsphereError,
    },
    /// The attempt stopped without recording a failure: the request stays
    /// in `Provisioning`; run the command again later to resume. Either the
    /// vCenter could not be used ([`VsphereError::is_unavailable`], from
    /// [`ProvisioningService::provision`] too: an outage costs time, never
    /// the request), or a retryable failure about the request itself met
    /// [`ProvisioningService::provision_attempt`].
    Deferred {
        /// dvmm's VM.
        vm_id: VmId,
        /// The retryable failure.
        error: VsphereError,
    },
    /// Nothing was done: the request is not `Approved` (already provisioned,
    /// failed, rejected, …, or being provisioned by another caller right now).
    Skipped {
        /// The request's status.
        status: VmRequestStatus,
        /// Why nothing was done.
        reason: String,
    },
}

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
}

type Sleeper = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// Where the service takes a request's claim before calling vSphere.
enum ClaimSource {
    /// Only this process provisions: claims live in memory and end with the
    /// call that holds them (so they cannot outlive a crash).
    Process(Arc<ProcessClaims>),
    /// Shared with other processes; renewed every quarter lease while the
    /// call works.
    Shared {
        port: Arc<dyn RequestClaims>,
        sleep: Sleeper,
        lease: Duration,
    },
}

/// In-process claims: a claim is free again as soon as the call that holds
/// it ends, however it ends (its token is dropped).
#[derive(Default)]
struct ProcessClaims {
    by_request: Mutex<HashMap<VmRequestId, (String, Weak<()>)>>,
}

impl ProcessClaims {
    fn acquire(&self, request_id: VmRequestId, holder: &str) -> Result<Arc<()>, String> {
        let mut map = self.by_request.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, token)) = map.get(&request_id)
            && token.strong_count() > 0
        {
            return Err(other.clone());
        }
        let token = Arc::new(());
        map.insert(request_id, (holder.to_owned(), Arc::downgrade(&token)));
        // Claims of finished calls are dropped as others are taken.
        map.retain(|_, (_, token)| token.strong_count() > 0);
        Ok(token)
    }
}

/// A claim the current call holds: valid until it lapses or a renewal
/// finds it taken over.
struct ClaimState {
    holder: String,
    lost: AtomicBool,
    /// When it lapses, on the service's clock; `None` when it cannot lapse
    /// while the call runs (in-process claims).
    until: Mutex<Option<DateTime<Utc>>>,
}

impl ClaimState {
    fn new(holder: &str, until: Option<DateTime<Utc>>) -> Self {
        Self {
            holder: holder.to_owned(),
            lost: AtomicBool::new(false),
            until: Mutex::new(until),
        }
    }

    fn until(&self) -> Option<DateTime<Utc>> {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn extend(&self, until: DateTime<Utc>) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    fn valid(&self, now: DateTime<Utc>) -> bool {
        !self.lost.load(Ordering::SeqCst) && self.until().is_none_or(|until| now < until)
    }
}

fn after(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
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

struct Loaded<A: Aggregate> {
    state: Option<A>,
    version: u64,
    last_event_id: Option<EventId>,
    events: Vec<(EventMetadata, A::Event)>,
}

/// What a provisioning run does about vSphere.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Call vSphere and record every failure but an unavailable vCenter.
    Record,
    /// Call vSphere; leave retryable failures unrecorded.
    Defer,
    /// Do not call vSphere: it is known to be unusable with this error.
    Wait(&'a VsphereError),
    /// Do not call vSphere: record this failure (the provisioning was given
    /// up, e.g. after crashing one worker after another).
    Abandon(&'a str),
}

/// Who acts and as part of which user action.
#[derive(Clone, Copy)]
struct Actor {
    tenant: TenantId,
    user: UserId,
    correlation: CorrelationId,
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
        }
    }

    /// Takes requests' claims from `claims`, shared with every other caller
    /// of the deployment (the runner's work queue: `MemoryWorkQueue` within
    /// one process, `PgWorkQueue` across processes), instead of from this
    /// service alone. A claim lasts `lease` unless renewed; calls renew it
    /// every quarter lease through `timer`, so a crashed caller's claim
    /// lapses after at most `lease` and the next caller resumes the request.
    ///
    /// Without this, claims only exclude callers of this one service, which
    /// is right only when no other process provisions the same requests.
    pub fn with_claims<Q, W>(mut self, claims: Q, timer: W, lease: Duration) -> Self
    where
        Q: RequestClaims + 'static,
        W: Timer + 'static,
    {
        let timer = Arc::new(timer);
        self.claims = ClaimSource::Shared {
            port: Arc::new(claims),
            sleep: Arc::new(move |duration| {
                let timer = timer.clone();
                Box::pin(async move { timer.sleep(duration).await })
            }),
            lease: lease.max(Duration::from_millis(4)),
        };
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

    fn metadata(&self, actor: Actor, causation: Option<EventId>) -> EventMetadata {
        EventMetadata {
            event_id: EventId::from_uuid(self.ids.new_uuid()),
            tenant_id: actor.tenant,
            user_id: actor.user,
            correlation_id: actor.correlation,
            causation_id: causation,
            occurred_at: self.clock.now(),
        }
    }

    fn actor(&self, tenant: TenantId, user: UserId) -> Actor {
        Actor {
            tenant,
            user,
            correlation: CorrelationId::from_uuid(self.ids.new_uuid()),
        }
    }

    async fn load<A>(&self, tenant: TenantId, stream: &StreamId) -> Result<Loaded<A>, ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent,
    {
        let stored = self.store.load(tenant, stream).await?;
        let mut events = Vec::with_capacity(stored.len());
        let mut state = None;
        for event in &stored {
            let decoded = A::Event::decode(event)?;
            state = A::apply(state, &decoded);
            events.push((event.metadata.clone(), decoded));
        }
        Ok(Loaded {
            state,
            version: stored.last().map_or(0, |e| e.version),
            last_event_id: stored.last().map(|e| e.metadata.event_id),
            events,
        })
    }

    /// Appends events decided on `loaded`. `Ok(None)` means a conflict: the
    /// caller reloads and decides again.
    async fn append<A>(
        &self,
        actor: Actor,
        stream: &StreamId,
        loaded: &Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Option<Vec<(EventMetadata, A::Event)>>, ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent,
    {
        let mut causation = loaded.last_event_id;
        let mut written = Vec::with_capacity(events.len());
        let mut envelopes: Vec<NewEvent> = Vec::with_capacity(events.len());
        for event in events {
            let metadata = self.metadata(actor, causation);
            causation = Some(metadata.event_id);
            envelopes.push(event.to_new_event(metadata.clone()));
            written.push((metadata, event));
        }
        match self
            .store
            .append(actor.tenant, stream, loaded.version, envelopes)
            .await
        {
            Ok(_) => Ok(Some(written)),
            Err(e) if e.is_conflict() => {
                debug!(%stream, "concurrent modification; reloading");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `command` against an aggregate with conflict retries. Returns the
    /// state after the command and the events it wrote.
    async fn execute<A>(
        &self,
        actor: Actor,
        stream: &StreamId,
        command: &A::Command,
    ) -> Result<(A, Vec<(EventMetadata, A::Event)>), ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent,
    {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let loaded = self.load::<A>(actor.tenant, stream).await?;
            let events = A::handle(loaded.state.as_ref(), command)?;
            let state = events.iter().fold(loaded.state.clone(), A::apply);
            if let Some(written) = self.append(actor, stream, &loaded, events).await? {
                let state = state.ok_or(DomainError::NotFound {
                    aggregate: A::STREAM_TYPE,
                })?;
                return Ok((state, written));
            }
        }
        Err(ServiceError::TooManyConflicts {
            stream: stream.clone(),
        })
    }

    /// Files a new request (status `Pending`) and records `Created` on the
    /// timeline. Returns the new request's id.
    ///
    /// # Errors
    /// [`ServiceError::Domain`] for a bad name (the message says which part is
    /// wrong), [`ServiceError::UnknownTenant`], or a store failure.
    pub async fn submit(&self, request: NewVmRequest) -> Result<VmRequestId, ServiceError> {
        let config = self.tenant(request.tenant_id)?;
        let request_id = VmRequestId::from_uuid(self.ids.new_uuid());
        let command = VmRequestCommand::Submit(SubmitVmRequest {
            request_id,
            tenant_id: request.tenant_id,
            project_id: request.project_id,
            project_prefix: request.project_prefix,
            requested_name: request.requested_name,
            size: request.size,
            resources: config.sizes.resources(request.size),
            requested_by: request.requested_by,
            justification: request.justification,
        });
        let actor = self.actor(request.tenant_id, request.requested_by);
        let (_, written) = self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await?;
        self.record_request_timeline(request.tenant_id, request_id, &written)
            .await?;
        Ok(request_id)
    }

    async fn decide(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        user: UserId,
        command: VmRequestCommand,
    ) -> Result<VmRequest, ServiceError> {
        let actor = self.actor(tenant, user);
        let (state, written) = self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await
            .map_err(|e| match e {
                ServiceError::Domain(DomainError::NotFound { .. }) => {
                    ServiceError::RequestNotFound(request_id)
                }
                e => e,
            })?;
        self.record_request_timeline(tenant, request_id, &written)
            .await?;
        Ok(state)
    }

    /// Approves a pending request, recording who approved it. Provisioning
    /// starts with [`ProvisioningService::provision`] (directly, or from a
    /// background runner).
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::Domain`] when the
    /// request is not pending, or a store failure.
    pub async fn approve(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        approver: UserId,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            approver,
            VmRequestCommand::Approve { by: approver },
        )
        .await
    }

    /// Rejects a pending request with a reason the requester can read.
    ///
    /// # Errors
    /// As [`ProvisioningService::approve`]; an empty reason is refused.
    pub async fn reject(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        approver: UserId,
        reason: impl Into<String>,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            approver,
            VmRequestCommand::Reject {
                by: approver,
                reason: reason.into(),
            },
        )
        .await
    }

    /// Cancels a request that is pending or approved (not yet provisioning).
    ///
    /// # Errors
    /// As [`ProvisioningService::approve`].
    pub async fn cancel(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        user: UserId,
        reason: Option<String>,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            user,
            VmRequestCommand::Cancel { by: user, reason },
        )
        .await
    }

    /// The current state of a request.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn request(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Option<VmRequest>, ServiceError> {
        Ok(self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?
            .state)
    }

    /// The current state of a VM.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn vm(&self, tenant: TenantId, vm_id: VmId) -> Result<Option<Vm>, ServiceError> {
        Ok(self.load::<Vm>(tenant, &vm_stream(vm_id)).await?.state)
    }

    /// A request's timeline, oldest first.
    ///
    /// # Errors
    /// A store failure.
    pub async fn timeline(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, ServiceError> {
        Ok(self.timeline.list(tenant, request_id).await?)
    }

    /// Every request of a tenant, in the order they were filed.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn list_requests(&self, tenant: TenantId) -> Result<Vec<VmRequest>, ServiceError> {
        let mut order = Vec::new();
        let mut requests: BTreeMap<String, Option<VmRequest>> = BTreeMap::new();
        let mut after = 0;
        loop {
            let page = self.store.read_all(tenant, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for stored in page
                .iter()
                .filter(|e| e.stream_id.stream_type == VmRequest::STREAM_TYPE)
            {
                let event = VmRequestEvent::decode(stored)?;
                let slot = requests
                    .entry(stored.stream_id.id.clone())
                    .or_insert_with(|| {
                        order.push(stored.stream_id.id.clone());
                        None
                    });
                *slot = VmRequest::apply(slot.take(), &event);
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|id| requests.remove(&id).flatten())
            .collect())
    }

    /// Provisions the VM of an approved request: records the start, calls
    /// [`VspherePort::create_vm`], records the outcome on the VM stream, the
    /// request stream and the timeline.
    ///
    /// Idempotent: for a request that is not `Approved` (or `Provisioning`
    /// after a crash) it does nothing and returns [`ProvisionOutcome::Skipped`]
    /// saying why. A request left in `Provisioning` by a crashed run is
    /// resumed: the VM that run created is adopted, never cloned twice.
    /// vSphere failures are not errors of this call: they are recorded and
    /// returned as [`ProvisionOutcome::Failed`], except that an unavailable
    /// vCenter ([`VsphereError::is_unavailable`]) is not held against the
    /// request: the request records that it waits for vCenter (once per
    /// outage: one "Waiting for vCenter" on the timeline) and the call
    /// returns [`ProvisionOutcome::Deferred`]; call it again later. Only a
    /// request that has waited longer than the tenant's
    /// `timeouts.unavailable_deadline_secs` fails, with a message saying
    /// since when vCenter was unreachable (and naming no host).
    ///
    /// `create_vm` is called once: retrying a call is the vSphere client's
    /// job and retrying a request the runner's, so no layer here multiplies
    /// the attempts of another.
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::UnknownTenant`], or a
    /// store failure (rerun the call to finish the job).
    pub async fn provision(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Record, &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// [`ProvisioningService::provision`] under `holder`'s claim: for a
    /// runner whose work-queue lease on the job is the claim (its worker id
    /// is the holder), so the call re-enters that claim instead of waiting
    /// for it.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Record, holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// [`ProvisioningService::provision_attempt`] under `holder`'s claim
    /// (see [`ProvisioningService::provision_as`]).
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_attempt_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Defer, holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// [`ProvisioningService::wait_for_vcenter`] under `holder`'s claim
    /// (see [`ProvisioningService::provision_as`]).
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn wait_for_vcenter_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        error: &VsphereError,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Wait(error), holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Like [`ProvisioningService::provision`], but any *retryable* vSphere
    /// failure is not recorded: the request stays in `Provisioning` and the
    /// call returns [`ProvisionOutcome::Deferred`], so a background runner
    /// can try again later (with backoff) and resume where this attempt
    /// stopped. Non-retryable failures are recorded as usual.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_attempt(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Defer, &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Asks the request's vCenter a cheap question (whether the request's VM
    /// exists) to learn whether it can be used again: `None` when it
    /// answered (whatever the answer), else the error that says it is still
    /// unavailable. For a background runner probing a vCenter it parked;
    /// nothing is recorded.
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::UnknownTenant`], or a
    /// store failure.
    pub async fn check_vcenter(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Option<VsphereError>, ServiceError> {
        let request = self
            .request(tenant, request_id)
            .await?
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        let config = self.tenant(tenant)?;
        // find_vm looks up the name in the folder; the id only matters to
        // adoption, so a request not started yet can use a placeholder.
        let vm_id = request.vm_id.unwrap_or(VmId::from_uuid(uuid::Uuid::nil()));
        let spec = VmSpec::for_request(
            config,
            request_id,
            vm_id,
            &request.vm_name,
            &request.project_prefix,
            request.resources,
        );
        match self.vsphere.find_vm(&spec).await {
            Err(error) if error.is_unavailable() => Ok(Some(error)),
            Err(error) => {
                debug!(%error, "vCenter answered the probe with an error; it is reachable");
                Ok(None)
            }
            Ok(_) => Ok(None),
        }
    }

    /// Records, without calling vSphere, that the request waits for its
    /// vCenter, which is known to be unusable (`error`, e.g. what the last
    /// attempt against that vCenter met): for a background runner that holds
    /// back the work of an endpoint that is down. Like an attempt that met
    /// `error`, it starts provisioning an `Approved` request, writes "Waiting
    /// for vCenter" once per outage and returns
    /// [`ProvisionOutcome::Deferred`], or fails the request once it has
    /// waited longer than the tenant's `timeouts.unavailable_deadline_secs`.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn wait_for_vcenter(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        error: &VsphereError,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Wait(error), &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Fails the request without calling vSphere, with `message` (which
    /// must say why and name no host): for a background runner that gives
    /// up on a request whose provisioning kept stopping without finishing
    /// (each worker that took it died or hung). Like an attempt, it starts
    /// provisioning an `Approved` request first, and a VM stream that already
    /// holds the outcome wins: a VM recorded ready makes the request ready.
    /// Requests in other states are skipped.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn abandon(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        message: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.abandon_as(tenant, request_id, message, &self.holder)
            .await
    }

    /// [`ProvisioningService::abandon`] under `holder`'s claim (see
    /// [`ProvisioningService::provision_as`]): the runner gives up on a job
    /// whose lease it holds.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn abandon_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        message: &str,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Abandon(message), holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Takes the request's claim, provisions under it (renewing it meanwhile
    /// when it is shared) and gives it back.
    async fn provision_inner(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        mode: Mode<'_>,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        match &self.claims {
            ClaimSource::Process(claims) => {
                // In-process claims cost nothing to take, so the request is
                // read only when another call has it.
                let _token = match claims.acquire(request_id, holder) {
                    Ok(token) => token,
                    Err(other) => {
                        return Ok(match self.open_request(tenant, request_id).await? {
                            Ok(request) => held_elsewhere(&request, &other, None),
                            Err(skipped) => skipped,
                        });
                    }
                };
                let claim = ClaimState::new(holder, None);
                self.provision_claimed(tenant, request_id, mode, &claim)
                    .await
            }
            ClaimSource::Shared { port, sleep, lease } => {
                // A shared claim is a job row: a request that is pending or
                // finished is answered without taking (and so without
                // queueing) anything.
                let request = match self.open_request(tenant, request_id).await? {
                    Ok(request) => request,
                    Err(skipped) => return Ok(skipped),
                };
                let started = self.clock.now();
                let fresh = match port.acquire(tenant, request_id, holder, *lease).await? {
                    ClaimAttempt::Acquired { .. } => true,
                    ClaimAttempt::AlreadyHeld { .. } => false,
                    ClaimAttempt::HeldBy(other) => {
                        return Ok(held_elsewhere(&request, &other.holder, Some(other.until)));
                    }
                };
                let claim = ClaimState::new(holder, Some(after(started, *lease)));
                let work = self.provision_claimed(tenant, request_id, mode, &claim);
                let outcome = if fresh {
                    let renew = self.renew_claim(port.as_ref(), sleep, *lease, &claim, request_id);
                    let mut work = std::pin::pin!(work);
                    let renew = std::pin::pin!(renew);
                    match futures::future::select(work.as_mut(), renew).await {
                        futures::future::Either::Left((outcome, _)) => outcome,
                        // Lost: the work stops at its next check, before
                        // calling vSphere again.
                        futures::future::Either::Right(((), _)) => work.await,
                    }
                } else {
                    // Whoever took the claim first renews and releases it.
                    work.await
                };
                if fresh {
                    let finished = matches!(
                        outcome,
                        Ok(ProvisionOutcome::Ready { .. } | ProvisionOutcome::Failed { .. })
                    );
                    if let Err(error) = port.release_claim(holder, request_id, finished).await {
                        warn!(%error, "could not give the claim back; it lapses by itself");
                    }
                }
                outcome
            }
        }
    }

    /// The request when it is approved or provisioning (work that may call
    /// vSphere), else the answer that nothing is to be done.
    async fn open_request(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Result<VmRequest, ProvisionOutcome>, ServiceError> {
        let loaded = self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?;
        let request = loaded
            .state
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        if matches!(
            request.status,
            VmRequestStatus::Approved | VmRequestStatus::Provisioning
        ) {
            return Ok(Ok(request));
        }
        // The timeline must show what the stream says (a crash may have cut
        // it short), as on every other path.
        self.record_request_timeline(tenant, request_id, &loaded.events)
            .await?;
        let reason = skip_reason(&request);
        info!(status = %request.status, "nothing to provision: {reason}");
        Ok(Err(ProvisionOutcome::Skipped {
            status: request.status,
            reason,
        }))
    }

    /// Renews a shared claim every quarter lease until it is lost (taken
    /// over, or not renewed before it lapsed); never returns otherwise.
    async fn renew_claim(
        &self,
        port: &dyn RequestClaims,
        sleep: &Sleeper,
        lease: Duration,
        claim: &ClaimState,
        request_id: VmRequestId,
    ) {
        loop {
            sleep(lease / 4).await;
            let started = self.clock.now();
            match port.renew_claim(&claim.holder, request_id, lease).await {
                Ok(true) => claim.extend(after(started, lease)),
                Ok(false) => {
                    warn!(holder = %claim.holder, "the claim was taken over; stopping before the next vSphere call");
                    claim.lose();
                    return;
                }
                Err(error) if !claim.valid(self.clock.now()) => {
                    warn!(holder = %claim.holder, %error, "the claim lapsed: it could not be renewed in time; stopping before the next vSphere call");
                    claim.lose();
                    return;
                }
                Err(error) => {
                    warn!(holder = %claim.holder, %error, "renewing the claim failed; trying again");
                }
            }
        }
    }

    /// Stops the call unless it still holds the claim: for just before a
    /// vSphere call or recording a failure (the new holder may be about to
    /// adopt the VM).
    fn check_claim(&self, claim: &ClaimState, request_id: VmRequestId) -> Result<(), ServiceError> {
        if claim.valid(self.clock.now()) {
            Ok(())
        } else {
            claim.lose();
            Err(ServiceError::ClaimLost {
                request_id,
                holder: claim.holder.clone(),
            })
        }
    }

    async fn provision_claimed(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        mode: Mode<'_>,
        claim: &ClaimState,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let stream = request_stream(request_id);
        let mut started_here = false;
        let (request, actor, vm_id) = 'claim: {
            for _ in 0..MAX_CONFLICT_RETRIES {
                let loaded = self.load::<VmRequest>(tenant, &stream).await?;
                let Some(request) = loaded.state.clone() else {
                    return Err(ServiceError::RequestNotFound(request_id));
                };
                tracing::Span::current().record("vm_name", request.vm_name.as_str());
                // Whatever happens next, the timeline must show what the
                // stream already says (a crash may have cut it short).
                self.record_request_timeline(tenant, request_id, &loaded.events)
                    .await?;
                let actor = Actor {
                    tenant,
                    user: request.decided_by.unwrap_or(request.requested_by),
                    correlation: loaded
                        .events
                        .last()
                        .map(|(m, _)| m.correlation_id)
                        .unwrap_or_else(|| CorrelationId::from_uuid(self.ids.new_uuid())),
                };
                match request.status {
                    VmRequestStatus::Approved => {}
                    VmRequestStatus::Provisioning if !started_here => {
                        // A previous run started and did not finish: resume.
                        let vm_id = request.vm_id.ok_or(DomainError::Invalid(
                            "a provisioning request without a VM id".into(),
                        ))?;
                        info!(%vm_id, "resuming an interrupted provisioning");
                        break 'claim (request, actor, vm_id);
                    }
                    VmRequestStatus::Provisioning => {
                        return Ok(ProvisionOutcome::Skipped {
                            status: request.status,
                            reason: "another caller started provisioning this request just now"
                                .into(),
                        });
                    }
                    status => {
                        let reason = skip_reason(&request);
                        info!(%status, "nothing to provision: {reason}");
                        return Ok(ProvisionOutcome::Skipped { status, reason });
                    }
                }
                let vm_id = VmId::from_uuid(self.ids.new_uuid());
                let events = VmRequest::handle(
                    Some(&request),
                    &VmRequestCommand::StartProvisioning { vm_id },
                )?;
                match self.append(actor, &stream, &loaded, events).await? {
                    Some(written) => {
                        self.record_request_timeline(tenant, request_id, &written)
                            .await?;
                        let request = written
                            .iter()
                            .try_fold(request, |s, (_, e)| VmRequest::apply(Some(s), e))
                            .ok_or(ServiceError::RequestNotFound(request_id))?;
                        break 'claim (request, actor, vm_id);
                    }
                    // Someone else changed the request: look again. If they
                    // started provisioning, we must not.
                    None => started_here = true,
                }
            }
            return Err(ServiceError::TooManyConflicts { stream });
        };
        tracing::Span::current().record("vm_id", tracing::field::display(vm_id));
        let config = self.tenant(tenant)?.clone();
        let fresh = VmSpec::for_request(
            &config,
            request_id,
            vm_id,
            &request.vm_name,
            &request.project_prefix,
            request.resources,
        );
        let vm = self.ensure_vm_started(actor, &request, &fresh).await?;
        let spec = match (recorded_spec(&config, &vm, fresh.clone()), mode) {
            // Giving up needs no vCenter, so a vCenter that is no longer
            // configured must not keep the request from failing.
            (Err(ServiceError::RecordedVcenterNotConfigured { .. }), Mode::Abandon(_)) => fresh,
            (spec, _) => spec?,
        };
        match vm.status {
            VmStatus::Provisioning => {}
            // A previous run recorded the outcome on the VM stream but not on
            // the request: finish that.
            VmStatus::Failed => {
                let failure =
                    vm.failure
                        .clone()
                        .unwrap_or_else(|| crate::vm::VmProvisioningFailed {
                            error_code: "Unknown".into(),
                            message: "provisioning failed".into(),
                            retryable: false,
                        });
                return self
                    .finish_failed(actor, request_id, vm_id, failure, None)
                    .await;
            }
            _ => {
                let result = provisioned(&vm).ok_or(ServiceError::VmNotProvisioned {
                    vm_id,
                    status: vm.status,
                })?;
                return self.finish_ready(actor, request_id, vm_id, result).await;
            }
        }

        let created = match mode {
            Mode::Abandon(message) => {
                warn!(message, "giving up on this provisioning");
                let failure = crate::vm::VmProvisioningFailed {
                    error_code: ABANDONED.to_owned(),
                    message: message.to_owned(),
                    retryable: false,
                };
                self.execute_vm(
                    actor,
                    vm_id,
                    VmCommand::RecordFailed {
                        error_code: failure.error_code.clone(),
                        message: failure.message.clone(),
                        retryable: failure.retryable,
                    },
                )
                .await?;
                return self
                    .finish_failed(actor, request_id, vm_id, failure, None)
                    .await;
            }
            Mode::Wait(error) => Err(error.clone()),
            Mode::Record | Mode::Defer => {
                self.check_claim(claim, request_id)?;
                self.vsphere.create_vm(&spec).await
            }
        };
        match created {
            Ok(result) => {
                let at = self.clock.now();
                let vm = self
                    .execute_vm(
                        actor,
                        vm_id,
                        VmCommand::RecordProvisioned {
                            result: result.clone(),
                            at,
                        },
                    )
                    .await?;
                self.reconcile(actor, request_id, &vm, Some(result), None)
                    .await
            }
            // A request never fails because its vCenter cannot be reached:
            // the outage costs time, and a rerun resumes (adopting the VM if
            // the lost call created it).
            Err(error) if error.is_unavailable() => {
                self.wait_or_give_up(actor, &config, &request, vm_id, error, claim)
                    .await
            }
            Err(error) if error.is_retryable() && !matches!(mode, Mode::Record) => {
                warn!(error = %error, code = error.code(), "provisioning attempt failed; left for a retry");
                if request.waiting_since.is_some() {
                    // vCenter answered, so the wait is over; the next outage
                    // is a new one, with its own deadline.
                    let written = self
                        .execute_request_outcome(
                            actor,
                            request_id,
                            VmRequestCommand::MarkVcenterReachable,
                        )
                        .await?;
                    self.record_request_timeline(tenant, request_id, &written)
                        .await?;
                }
                Ok(ProvisionOutcome::Deferred { vm_id, error })
            }
            Err(error) => {
                warn!(error = %error, code = error.code(), "provisioning failed");
                // A failure is recorded only by the claim's holder: whoever
                // took over may be about to adopt the VM.
                self.check_claim(claim, request_id)?;
                let failure = crate::vm::VmProvisioningFailed {
                    error_code: error.code().to_owned(),
                    message: user_message(&error, &spec),
                    retryable: error.is_retryable(),
                };
                let vm = self
                    .execute_vm(
                        actor,
                        vm_id,
                        VmCommand::RecordFailed {
                            error_code: failure.error_code.clone(),
                            message: failure.message.clone(),
                            retryable: failure.retryable,
                        },
                    )
                    .await?;
                self.reconcile(actor, request_id, &vm, None, Some((failure, error)))
                    .await
            }
        }
    }

    /// The request's vCenter cannot be used: record that the request waits
    /// (once per outage) and defer it, or fail it once it has waited longer
    /// than the tenant's unavailable deadline.
    async fn wait_or_give_up(
        &self,
        actor: Actor,
        config: &TenantConfig,
        request: &VmRequest,
        vm_id: VmId,
        error: VsphereError,
        claim: &ClaimState,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let request_id = request.id;
        let since = match request.waiting_since {
            Some(since) => since,
            None => {
                let command = VmRequestCommand::WaitForVcenter {
                    since: self.clock.now(),
                    error_code: error.code().to_owned(),
                };
                match self
                    .execute::<VmRequest>(actor, &request_stream(request_id), &command)
                    .await
                {
                    Ok((state, written)) => {
                        self.record_request_timeline(actor.tenant, request_id, &written)
                            .await?;
                        state.waiting_since.unwrap_or_else(|| self.clock.now())
                    }
                    // A concurrent run got there first: go by what it wrote.
                    Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => {
                        let current = self
                            .request(actor.tenant, request_id)
                            .await?
                            .ok_or(ServiceError::RequestNotFound(request_id))?;
                        match current.waiting_since {
                            Some(since) => since,
                            None => {
                                return Ok(ProvisionOutcome::Skipped {
                                    status: current.status,
                                    reason: skip_reason(&current),
                                });
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let waited = (self.clock.now() - since).to_std().unwrap_or_default();
        let deadline = config.timeouts.unavailable_deadline();
        if waited < deadline {
            warn!(error = %error, code = error.code(), %since, "vCenter unavailable; provisioning waits for it");
            return Ok(ProvisionOutcome::Deferred { vm_id, error });
        }
        warn!(error = %error, code = error.code(), %since, ?deadline, "vCenter unavailable past the tenant's deadline; failing the request");
        let failure = crate::vm::VmProvisioningFailed {
            error_code: error.code().to_owned(),
            message: format!(
                "vCenter unreachable since {}; gave up after waiting {} minutes, this tenant's limit. Submit the request again once vCenter is back",
                utc_minute(since),
                deadline.as_secs().div_ceil(60)
            ),
            retryable: true,
        };
        self.check_claim(claim, request_id)?;
        let vm = self
            .execute_vm(
                actor,
                vm_id,
                VmCommand::RecordFailed {
                    error_code: failure.error_code.clone(),
                    message: failure.message.clone(),
                    retryable: failure.retryable,
                },
            )
            .await?;
        self.reconcile(actor, request_id, &vm, None, Some((failure, error)))
            .await
    }

    /// Records on the request what the VM stream says happened on vSphere,
    /// whichever run wrote it: a VM recorded ready makes the request ready
    /// even when this run's own attempt (a duplicate) failed, and a VM
    /// recorded failed first makes it failed. `created`/`failed` are what
    /// this run saw, reported when the stream agrees with them.
    async fn reconcile(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm: &Vm,
        created: Option<VmProvisioningResult>,
        failed: Option<(crate::vm::VmProvisioningFailed, VsphereError)>,
    ) -> Result<ProvisionOutcome, ServiceError> {
        if vm.status == VmStatus::Failed {
            let (failure, error) = match failed {
                Some((failure, error)) => (failure, Some(error)),
                None => {
                    warn!(
                        "another run recorded this VM as failed first; the request follows the VM's record"
                    );
                    (
                        vm.failure
                            .clone()
                            .unwrap_or_else(|| crate::vm::VmProvisioningFailed {
                                error_code: "Unknown".into(),
                                message: "provisioning failed".into(),
                                retryable: false,
                            }),
                        None,
                    )
                }
            };
            return self
                .finish_failed(actor, request_id, vm.id, failure, error)
                .await;
        }
        if failed.is_some() {
            info!(
                "a concurrent run recorded the VM as provisioned; this run's failure does not count"
            );
        }
        let result = match (provisioned(vm), created) {
            (Some(result), _) => result,
            (None, Some(result)) => result,
            (None, None) => {
                return Err(ServiceError::VmNotProvisioned {
                    vm_id: vm.id,
                    status: vm.status,
                });
            }
        };
        self.finish_ready(actor, request_id, vm.id, result).await
    }

    /// Makes sure the VM stream exists (a crash may have happened between the
    /// request's and the VM's start events) and returns the VM.
    async fn ensure_vm_started(
        &self,
        actor: Actor,
        request: &VmRequest,
        spec: &VmSpec,
    ) -> Result<Vm, ServiceError> {
        let started = VmProvisioningStarted {
            vm_id: spec.vm_id,
            request_id: request.id,
            tenant_id: request.tenant_id,
            name: request.vm_name.clone(),
            resources: request.resources,
            folder_path: spec.folder_path.clone(),
            placement: Some(Box::new(spec.placement())),
        };
        let stream = vm_stream(spec.vm_id);
        for _ in 0..MAX_CONFLICT_RETRIES {
            let loaded = self.load::<Vm>(actor.tenant, &stream).await?;
            if let Some(vm) = loaded.state {
                return Ok(vm);
            }
            let events = Vm::handle(None, &VmCommand::StartProvisioning(started.clone()))?;
            if let Some(written) = self.append(actor, &stream, &loaded, events).await? {
                return written
                    .iter()
                    .fold(None, |s, (_, e)| Vm::apply(s, e))
                    .ok_or(ServiceError::VmNotFound(spec.vm_id));
            }
        }
        Err(ServiceError::TooManyConflicts { stream })
    }

    /// Applies a command to the VM; when a concurrent run already recorded
    /// the outcome, returns the VM as that run left it.
    async fn execute_vm(
        &self,
        actor: Actor,
        vm_id: VmId,
        command: VmCommand,
    ) -> Result<Vm, ServiceError> {
        let stream = vm_stream(vm_id);
        match self.execute::<Vm>(actor, &stream, &command).await {
            Ok((vm, _)) => Ok(vm),
            Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => self
                .load::<Vm>(actor.tenant, &stream)
                .await?
                .state
                .ok_or(ServiceError::VmNotFound(vm_id)),
            Err(e) => Err(e),
        }
    }

    async fn finish_ready(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        result: VmProvisioningResult,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let written = self
            .execute_request_outcome(
                actor,
                request_id,
                VmRequestCommand::MarkReady(result.clone()),
            )
            .await?;
        self.record_request_timeline(actor.tenant, request_id, &written)
            .await?;
        info!(
            vmware_vm_id = %result.vmware_vm_id,
            ip = ?result.ip_address,
            "VM ready"
        );
        Ok(ProvisionOutcome::Ready { vm_id, result })
    }

    async fn finish_failed(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        failure: crate::vm::VmProvisioningFailed,
        error: Option<VsphereError>,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let written = self
            .execute_request_outcome(
                actor,
                request_id,
                VmRequestCommand::MarkFailed {
                    error_code: failure.error_code.clone(),
                    message: failure.message.clone(),
                    retryable: failure.retryable,
                },
            )
            .await?;
        self.record_request_timeline(actor.tenant, request_id, &written)
            .await?;
        let error = error.unwrap_or(VsphereError::TaskFailed {
            fault: failure.error_code,
            message: failure.message,
        });
        Ok(ProvisionOutcome::Failed { vm_id, error })
    }

    /// Records the outcome on the request; a concurrent run that recorded it
    /// first is fine (nothing more is written).
    async fn execute_request_outcome(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        command: VmRequestCommand,
    ) -> Result<Vec<(EventMetadata, VmRequestEvent)>, ServiceError> {
        match self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await
        {
            Ok((_, written)) => Ok(written),
            Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Reads a provisioned VM's live guest facts from vSphere (the user
    /// "refreshes to get the IP later") and records them when they changed.
    ///
    /// # Errors
    /// [`ServiceError::VmNotFound`], [`ServiceError::VmNotProvisioned`],
    /// [`ServiceError::Vsphere`], or a store failure.
    pub async fn refresh_guest_info(
        &self,
        tenant: TenantId,
        vm_id: VmId,
    ) -> Result<Vm, ServiceError> {
        let span = info_span!("refresh_guest_info", tenant = %tenant, vm_id = %vm_id);
        async {
            let config = self.tenant(tenant)?.clone();
            let stream = vm_stream(vm_id);
            let loaded = self.load::<Vm>(tenant, &stream).await?;
            let vm = loaded.state.ok_or(ServiceError::VmNotFound(vm_id))?;
            let vmware_vm_id = vm
                .vmware_vm_id
                .clone()
                .ok_or(ServiceError::VmNotProvisioned {
                    vm_id,
                    status: vm.status,
                })?;
            let info = self.vsphere.get_vm(&config.vcenter, &vmware_vm_id).await?;
            let user = loaded
                .events
                .last()
                .map(|(m, _)| m.user_id)
                .unwrap_or_else(|| UserId::from_uuid(self.ids.new_uuid()));
            let actor = self.actor(tenant, user);
            let command = VmCommand::RefreshGuestInfo {
                ip_address: info.ip_address,
                hostname: info.hostname,
                power_state: info.power_state,
            };
            let (vm, written) = self.execute::<Vm>(actor, &stream, &command).await?;
            for (metadata, event) in &written {
                if let VmEvent::VmGuestInfoRefreshed(e) = event {
                    let details = match e.ip_address {
                        Some(ip) => format!("Guest info refreshed - IP: {ip}"),
                        None => "Guest info refreshed (IP still pending)".to_owned(),
                    };
                    self.timeline
                        .record(TimelineEntry {
                            event_id: metadata.event_id,
                            tenant_id: tenant,
                            request_id: vm.request_id,
                            entry_type: TimelineEntryType::GuestInfoRefreshed,
                            details,
                            occurred_at: metadata.occurred_at,
                        })
                        .await?;
                }
            }
            Ok(vm)
        }
        .instrument(span)
        .await
    }

    async fn record_request_timeline(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        events: &[(EventMetadata, VmRequestEvent)],
    ) -> Result<(), ServiceError> {
        for (metadata, event) in events {
            let (entry_type, details) = timeline_entry_for(event);
            self.timeline
                .record(TimelineEntry {
                    event_id: metadata.event_id,
                    tenant_id: tenant,
                    request_id,
                    entry_type,
                    details,
                    occurred_at: metadata.occurred_at,
                })
                .await?;
        }
        Ok(())
    }
}

/// The spec of a VM whose provisioning started: built from what its start
/// recorded, so that a resume finds (and adopts) the VM it started even when
/// the tenant's configuration changed since; `fresh` (from the current
/// configuration) is what a new provisioning would use. Only the
/// credentials come from the current configuration, and only for the
/// recorded vCenter.
fn recorded_spec(config: &TenantConfig, vm: &Vm, fresh: VmSpec) -> Result<VmSpec, ServiceError> {
    let Some(placement) = &vm.placement else {
        // Started by a release that recorded only the folder: everything
        // else comes from the current configuration, as it did then.
        return Ok(VmSpec {
            folder_path: vm.folder_path.clone(),
            ..fresh
        });
    };
    if *placement == fresh.placement() {
        return Ok(fresh);
    }
    if endpoint_key(&placement.endpoint_url) != config.vcenter.key() {
        return Err(ServiceError::RecordedVcenterNotConfigured { vm_id: vm.id });
    }
    info!(
        folder = %placement.folder_path,
        datastore = %placement.datastore,
        "the tenant's configuration changed since this provisioning started; resuming with the recorded placement"
    );
    Ok(VmSpec::from_placement(
        placement,
        &config.vcenter,
        fresh.tenant_id,
        fresh.request_id,
        fresh.vm_id,
        &fresh.name,
        vm.resources,
    ))
}

/// The span of one provisioning; the VM name and id are recorded once known.
fn provision_span(tenant: TenantId, request_id: VmRequestId) -> tracing::Span {
    info_span!(
        "provision",
        request_id = %request_id,
        tenant = %tenant,
        vm_name = tracing::field::Empty,
        vm_id = tracing::field::Empty,
    )
}

/// The stream of a request.
pub fn request_stream(id: VmRequestId) -> StreamId {
    StreamId::new(VmRequest::STREAM_TYPE, id)
}

/// The stream of a VM.
pub fn vm_stream(id: VmId) -> StreamId {
    StreamId::new(Vm::STREAM_TYPE, id)
}

/// What a VM recorded as provisioned reports, from its stream.
fn provisioned(vm: &Vm) -> Option<VmProvisioningResult> {
    Some(VmProvisioningResult {
        vmware_vm_id: vm.vmware_vm_id.clone()?,
        ip_address: vm.ip_address,
        hostname: vm.hostname.clone().unwrap_or_else(|| vm.name.to_string()),
        warning_message: vm.warning_message.clone(),
    })
}

/// The answer to a caller that finds the request's claim held by another.
fn held_elsewhere(
    request: &VmRequest,
    holder: &str,
    until: Option<DateTime<Utc>>,
) -> ProvisionOutcome {
    let until = match until {
        Some(until) => format!(
            "until {} unless renewed",
            until.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => "until its call in this process ends".to_owned(),
    };
    let reason = format!(
        "{holder} holds this request's provisioning claim {until}; if it stops, the next caller resumes the request"
    );
    info!(status = %request.status, "not provisioning: {reason}");
    ProvisionOutcome::Skipped {
        status: request.status,
        reason,
    }
}

fn skip_reason(request: &VmRequest) -> String {
    match request.status {
        VmRequestStatus::Pending => "the request is not approved yet".into(),
        VmRequestStatus::Ready => "the VM is already provisioned".into(),
        VmRequestStatus::Rejected => "the request was rejected".into(),
        VmRequestStatus::Cancelled => "the request was cancelled".into(),
        VmRequestStatus::Failed => "provisioning already failed; file a new request".into(),
        VmRequestStatus::Approved | VmRequestStatus::Provisioning => {
            "the request is being provisioned".into()
        }
    }
}

/// The timeline entry a request event produces.
pub fn timeline_entry_for(event: &VmRequestEvent) -> (TimelineEntryType, String) {
    match event {
        VmRequestEvent::VmRequestCreated(e) => (
            TimelineEntryType::Created,
            format!(
                "Request created: {} ({}: {} vCPU, {} MiB, {} GiB)",
                e.vm_name, e.size, e.resources.cpu, e.resources.memory_mib, e.resources.disk_gib
            ),
        ),
        VmRequestEvent::VmRequestApproved(e) => (
            TimelineEntryType::Approved,
            format!("Approved by {}", e.approved_by),
        ),
        VmRequestEvent::VmRequestRejected(e) => (
            TimelineEntryType::Rejected,
            format!("Rejected: {}", e.reason),
        ),
        VmRequestEvent::VmRequestCancelled(e) => (
            TimelineEntryType::Cancelled,
            match &e.reason {
                Some(reason) => format!("Cancelled: {reason}"),
                None => "Cancelled".to_owned(),
            },
        ),
        VmRequestEvent::VmRequestProvisioningStarted(_) => (
            TimelineEntryType::ProvisioningStarted,
            "Provisioning started".to_owned(),
        ),
        VmRequestEvent::VmRequestReady(e) => (
            TimelineEntryType::VmReady,
            match e.ip_address {
                Some(ip) => format!("VM ready - IP: {ip}"),
                None => "VM ready (IP pending)".to_owned(),
            },
        ),
        VmRequestEvent::VmRequestProvisioningFailed(e) => (
            TimelineEntryType::ProvisioningFailed,
            format!(
                "Provisioning failed: {} {}",
                e.message,
                if e.retryable {
                    "(temporary problem: retrying may help)"
                } else {
                    "(retrying will not help until this is fixed)"
                }
            ),
        ),
        VmRequestEvent::VmRequestWaitingForVcenter(e) => (
            TimelineEntryType::WaitingForVcenter,
            format!(
                "Waiting for vCenter: unreachable since {}; provisioning continues when it is back",
                utc_minute(e.since)
            ),
        ),
        VmRequestEvent::VmRequestVcenterReachable(_) => (
            TimelineEntryType::VcenterReachable,
            "vCenter is reachable again; provisioning continues".to_owned(),
        ),
    }
}

/// A time as users read it in messages, with the date: a wait can outlast
/// midnight.
fn utc_minute(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A failure message a user (or their platform team) can act on. It names
/// no host, URL or credential: vCenter's own text is kept only where it
/// describes the request (capacity, task faults), and the detail of
/// connection problems goes to the log instead.
pub fn user_message(error: &VsphereError, spec: &VmSpec) -> String {
    match error {
        VsphereError::NotFound { kind, name } => format!(
            "the {kind} {name:?} configured for this tenant does not exist in vCenter; ask the platform team to fix the tenant configuration"
        ),
        VsphereError::DuplicateName { name, location } => format!(
            "a VM named {name:?} that dvmm did not create already exists in folder {location:?}; choose another name"
        ),
        VsphereError::InsufficientResources { message } => format!(
            "not enough capacity for {} vCPU / {} MiB / {} GiB ({message}); choose a smaller size or ask the platform team for capacity",
            spec.resources.cpu, spec.resources.memory_mib, spec.resources.disk_gib
        ),
        VsphereError::InvalidLogin { .. } => {
            "vCenter refused dvmm's credentials for this tenant; ask the platform team to update them".into()
        }
        VsphereError::NotAuthenticated => {
            "vCenter ended dvmm's session and a new login did not take; ask the platform team to check the tenant's credentials".into()
        }
        VsphereError::Tls { .. } => {
            "vCenter's certificate was not trusted; ask the platform team to check the tenant's TLS settings".into()
        }
        VsphereError::Transport { .. } | VsphereError::CircuitOpen { .. } => {
            "vCenter could not be reached; this is temporary: retrying later may help".into()
        }
        VsphereError::Timeout { operation } => {
            format!("vCenter did not finish {operation} in time")
        }
        VsphereError::InvalidPowerState { message } => {
            format!("the VM was in the wrong power state: {message}")
        }
        VsphereError::TaskFailed { fault, message } => {
            format!("vCenter reported {fault}: {message}")
        }
        VsphereError::Protocol { .. } => {
            "vCenter answered something dvmm could not understand; ask the platform team to check the vCenter endpoint".into()
        }
        VsphereError::AnswerTooLarge { limit_bytes } => format!(
            "vCenter's answer was larger than the {limit_bytes}-byte limit; ask the platform team to check the vCenter endpoint"
        ),
    }
}
