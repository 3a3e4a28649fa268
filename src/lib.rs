#![doc = include_str!("../README.md")]

/// The domain crate, whole, for what the paths below do not name.
pub use dvmm_core as core;

// What a host names, at the root: the service and its commands' types, every
// port trait with the shipped clocks and id generators, the runner, the
// configuration and the values and errors it meets.
pub use dvmm_core::{
    Aggregate, AppendOutcome, Backoff, BoxError, CheckpointStore, ClaimAttempt, ClaimHolder, Clock,
    ConfigError, DomainError, DomainEvent, EventDecodeError, EventMetadata, EventStore, FeedReport,
    IdGenerator, Job, ManualClock, NameError, NamePart, NewEvent, NewVmRequest, PoisonEvent,
    PowerState, ProvisionOutcome, ProvisioningRunner, ProvisioningService, RandomIds,
    RequestClaims, ResourceError, RunnerConfig, RunnerConfigError, RunnerReport, Secret,
    SequentialIds, ServiceError, SizeTable, StoreError, StoredEvent, StreamId, SystemClock,
    TenantConfig, Tenants, TextLocation, TimelineEntry, TimelineEntryType, TimelineSink, Timeouts,
    Timer, UnknownSize, VcenterEndpoint, Vm, VmEvent, VmGuestInfo, VmName, VmPlacement,
    VmProvisioningResult, VmRequest, VmRequestEvent, VmRequestStatus, VmResources, VmSize, VmSpec,
    VmStatus, VsphereError, VspherePort, WorkQueue,
};
pub use dvmm_core::{
    CorrelationId, EventId, ProjectId, TenantId, UserId, VmId, VmRequestId, VmwareVmId,
};

// The domain's modules under their own names, so `dvmm::config::…`,
// `dvmm::ports::…` and so on read as `dvmm_core::…` does.
pub use dvmm_core::{
    aggregate, backoff, clock, config, error, event, ids, ports, provisioning, size, spec,
    telemetry, timeline, vm, vm_request,
};

/// The background runner: its engine and configuration, the ports it
/// drives, and [`TokioTimer`] to run it on tokio.
pub mod runner {
    pub use crate::TokioTimer;
    pub use dvmm_core::runner::*;
}

/// Persistence adapters, one module per backend with the same shape: an
/// event store, a timeline, the runner's work queue and checkpoints.
pub mod store {
    /// In memory (always available): for tests, demos and single-process
    /// hosts that can lose their history.
    pub use dvmm_store_memory as memory;

    /// PostgreSQL (feature `postgres`): durable, tenant-isolated by
    /// row-level security, shared by worker processes.
    #[cfg(feature = "postgres")]
    pub use dvmm_store_postgres as postgres;

    // Paths from before the backends were symmetrical. Nothing in the
    // workspace uses them any more; they stay, hidden, until work started
    // on the old paths has landed.
    #[doc(hidden)]
    pub use dvmm_store_memory::{
        MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue,
    };
}

/// vSphere adapters (feature `vsphere`, on by default), one module per
/// [`VspherePort`] implementation.
#[cfg(feature = "vsphere")]
pub mod vsphere {
    /// The client for a real vCenter over vim25 SOAP.
    pub mod soap {
        /// The SOAP envelope and fault layer.
        pub use dvmm_vsphere::soap as envelope;
        pub use dvmm_vsphere::tls::TlsPolicy;
        pub use dvmm_vsphere::{SoapOptions, SoapVsphere, VM_ID_KEY};
        /// The layers under the client, for hosts that script or decorate
        /// the transport.
        pub use dvmm_vsphere::{methods, session, tls, transport, types, wait};
    }

    /// The in-process vCenter simulator, with fault injection.
    pub use dvmm_vsphere::sim;

    // Paths from before the adapters were symmetrical (see `store`).
    #[doc(hidden)]
    pub use dvmm_vsphere::{SoapOptions, SoapVsphere, adapter, options};
}

pub mod any;
mod runner_handle;
pub use dvmm_core::runner::RunnerHealth;
pub use runner_handle::{RunnerError, RunnerExt, RunnerHandle};

pub mod wait;

/// What most hosts need, in one import: `use dvmm::prelude::*;`.
///
/// The service and its inputs and outcomes, the ids, the port traits (so
/// their methods resolve and they can be named in bounds), the shipped
/// clocks, the runner and [`TokioTimer`]. Adapters stay behind their paths
/// ([`crate::store`], [`crate::vsphere`]) so the choice of backend is
/// visible where it is made.
pub mod prelude {
    pub use crate::{RunnerExt, RunnerHandle, TokioTimer};
    pub use dvmm_core::{
        CheckpointStore, Clock, ConfigError, EventStore, IdGenerator, NameError, NewVmRequest,
        ProvisionOutcome, ProvisioningRunner, ProvisioningService, RandomIds, RequestClaims,
        RunnerConfig, RunnerReport, ServiceError, SizeTable, SystemClock, TenantConfig, Tenants,
        TimelineEntry, TimelineEntryType, TimelineSink, Timer, VmRequest, VmRequestStatus, VmSize,
        VsphereError, VspherePort, WorkQueue,
    };
    pub use dvmm_core::{ProjectId, TenantId, UserId, VmId, VmRequestId};
}

/// [`Timer`] on tokio's clock, for the [`ProvisioningRunner`] and
/// [`ProvisioningService::with_claims`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn sleep(&self, duration: std::time::Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(duration)
    }
}
