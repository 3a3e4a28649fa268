//! Event storage.

use std::future::Future;
use std::sync::Arc;

use crate::event::{NewEvent, StoredEvent, StreamId};
use crate::ids::TenantId;

use super::BoxError;

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The events were written; the stream is now at `new_version`.
    Appended {
        /// Stream version after the append.
        new_version: u64,
        /// Global position of the last event written.
        last_position: u64,
    },
    /// These exact events (by event id) were already stored by an earlier
    /// call whose acknowledgement was lost; nothing was written.
    AlreadyApplied {
        /// Current stream version.
        stream_version: u64,
    },
}

/// A persistence port failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the stream is not at the expected version.
    /// Reload and decide again.
    #[error("conflict on stream {stream}: expected version {expected}, found {actual:?}")]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: u64,
        /// What the store has, when known.
        actual: Option<u64>,
    },
    /// The call itself is wrong (e.g. an event of another tenant).
    #[error("invalid append to {stream}: {reason}")]
    InvalidAppend {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error("event store failed to {operation}: {message}")]
    Backend {
        /// What was being done (`append`, `load`, …).
        operation: &'static str,
        /// What went wrong.
        message: String,
        /// Whether trying again may help (connection lost, serialization
        /// failure), as opposed to a broken schema or bad data.
        retryable: bool,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict { .. } => true,
            StoreError::InvalidAppend { .. } => false,
            StoreError::Backend { retryable, .. } => *retryable,
        }
    }
}

/// Append-only event storage with optimistic concurrency, scoped by tenant.
///
/// Contract (checked by `dvmm_core::testing::store_conformance`):
/// - `append` writes all events or none. The stream must be at
///   `expected_version` (0 = the stream does not exist yet), else
///   [`StoreError::Conflict`]. Versions are contiguous from 1.
/// - Re-appending a batch whose event ids are already stored in that stream
///   returns [`AppendOutcome::AlreadyApplied`] and writes nothing.
/// - Every event's `metadata.tenant_id` must equal `tenant`.
/// - `load` returns a stream's events in version order; a stream of another
///   tenant looks like a missing stream (empty).
/// - `read_all` returns the tenant's events with position > `after`, in
///   position order, at most `limit`, and never skips an event that commits
///   later with a lower position.
pub trait EventStore: Send + Sync {
    /// Appends `events` to `stream`.
    fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send;

    /// Loads a stream (empty if it does not exist for this tenant).
    fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;

    /// Reads the tenant's events after global position `after`.
    fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;
}

impl<T: EventStore + ?Sized> EventStore for Arc<T> {
    fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        (**self).append(tenant, stream, expected_version, events)
    }

    fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send {
        (**self).load(tenant, stream)
    }

    fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send {
        (**self).read_all(tenant, after, limit)
    }
}
