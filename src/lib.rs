#![doc = include_str!("../README.md")]

pub use dvmm_core as core;
pub use dvmm_core::{
    Aggregate, AppendOutcome, Backoff, Clock, DomainError, DomainEvent, EventMetadata, EventStore,
    NewEvent, NewVmRequest, ProvisionOutcome, ProvisioningService, ServiceError, StoreError,
    StoredEvent, StreamId, TenantConfig, Tenants, TimelineEntry, TimelineEntryType, TimelineSink,
    Vm, VmEvent, VmName, VmProvisioningResult, VmRequest, VmRequestEvent, VmRequestStatus,
    VmResources, VmSize, VmSpec, VmStatus, VsphereError, VspherePort,
};
pub use dvmm_core::{
    CorrelationId, EventId, ProjectId, TenantId, UserId, VmId, VmRequestId, VmwareVmId,
};

/// Persistence adapters.
pub mod store {
    /// In-memory event store and timeline (always available).
    pub use dvmm_store_memory as memory;
    pub use dvmm_store_memory::{
        MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue,
    };

    /// PostgreSQL event store and timeline (feature `postgres`).
    #[cfg(feature = "postgres")]
    pub use dvmm_store_postgres as postgres;
}

/// vSphere adapters: the SOAP client and the in-process simulator
/// (feature `vsphere`, on by default).
#[cfg(feature = "vsphere")]
pub use dvmm_vsphere as vsphere;

pub use dvmm_core::runner::{ProvisioningRunner, RunnerConfig, RunnerHealth, RunnerReport};

mod runner_handle;
pub use runner_handle::{RunnerError, RunnerExt, RunnerHandle};

pub mod wait;

/// [`dvmm_core::runner::Timer`] on tokio's clock, for the
/// [`ProvisioningRunner`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl dvmm_core::runner::Timer for TokioTimer {
    fn sleep(&self, duration: std::time::Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(duration)
    }
}
