//! Time, waiting and new ids, so the domain never reads the wall clock or a
//! random generator directly, nor depends on an async runtime, and tests
//! stay deterministic.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Where the current time comes from.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}

/// Where new UUIDs (event ids, VM ids, correlation ids) come from.
pub trait IdGenerator: Send + Sync {
    /// A new, never before returned id.
    fn new_uuid(&self) -> Uuid;
}

impl<I: IdGenerator + ?Sized> IdGenerator for std::sync::Arc<I> {
    fn new_uuid(&self) -> Uuid {
        (**self).new_uuid()
    }
}

/// Waiting, supplied by the host's async runtime.
pub trait Timer: Send + Sync {
    /// Completes after `duration`.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
}
