#![doc = include_str!("../README.md")]

pub mod aggregate;
pub mod backoff;
pub mod clock;
pub mod config;
mod config_spans;
pub mod error;
pub mod event;
pub mod ids;
pub mod ports;
pub mod provisioning;
pub mod read_model;
pub mod runner;
pub mod size;
pub mod spec;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod timeline;
pub mod vm;
pub mod vm_request;

pub use aggregate::Aggregate;
pub use backoff::Backoff;
pub use clock::{ManualClock, RandomIds, SequentialIds, SystemClock};
pub use config::{ConfigError, Secret, TenantConfig, TextLocation, Timeouts, VcenterEndpoint};
pub use error::DomainError;
pub use event::{DomainEvent, EventDecodeError, EventMetadata, NewEvent, StoredEvent, StreamId};
pub use ids::*;
pub use ports::{
    AppendOutcome, BoxError, CheckpointStore, ClaimAttempt, ClaimHolder, Clock, EventStore,
    IdGenerator, Job, RequestClaims, StoreError, TimelineSink, Timer, VsphereError, VspherePort,
    WorkQueue,
};
pub use provisioning::{
    NewVmRequest, ProvisionOutcome, ProvisioningService, ServiceError, Tenants,
};
pub use runner::{
    FeedReport, PoisonEvent, ProvisioningRunner, RunnerConfig, RunnerConfigError, RunnerReport,
};
pub use size::{ResourceError, SizeTable, UnknownSize, VmResources, VmSize};
pub use spec::{
    NameError, NamePart, PowerState, VmGuestInfo, VmName, VmPlacement, VmProvisioningResult, VmSpec,
};
pub use timeline::{TimelineEntry, TimelineEntryType};
pub use vm::{Vm, VmEvent, VmStatus};
pub use vm_request::{VmRequest, VmRequestEvent, VmRequestStatus};
