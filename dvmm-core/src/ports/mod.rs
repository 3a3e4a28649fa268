//! Ports: what the domain needs from the outside world, one file per
//! family. Adapters live in other crates (`dvmm-store-memory`,
//! `dvmm-store-postgres`, `dvmm-vsphere`) and in [`crate::clock`].

/// A boxed future, as [`RequestClaims`] returns.
pub use futures::future::BoxFuture;

mod checkpoints;
mod claims;
mod store;
mod time;
mod timeline;
mod vsphere;
mod work_queue;

pub use checkpoints::CheckpointStore;
pub use claims::{ClaimAttempt, ClaimHolder, RequestClaims};
pub use store::{AppendOutcome, EventStore, StoreError};
pub use time::{Clock, IdGenerator, Timer};
pub use timeline::TimelineSink;
pub use vsphere::{
    PowerOffMode, PowerOffOutcome, ProgressReporter, ProvisioningProgress, VsphereError,
    VspherePort,
};
pub use work_queue::{Job, QueueCounts, WorkQueue};

/// Boxed error source kept by adapter errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
