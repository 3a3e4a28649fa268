//! The user-facing request history.

use std::future::Future;
use std::sync::Arc;

use crate::ids::{TenantId, VmRequestId};
use crate::timeline::TimelineEntry;

use super::StoreError;

/// The user-facing request history.
pub trait TimelineSink: Send + Sync {
    /// Records an entry. Idempotent: an entry whose `event_id` is already
    /// recorded is kept once.
    fn record(&self, entry: TimelineEntry) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A request's entries, oldest first.
    fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<Vec<TimelineEntry>, StoreError>> + Send;
}

impl<T: TimelineSink + ?Sized> TimelineSink for Arc<T> {
    fn record(&self, entry: TimelineEntry) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).record(entry)
    }

    fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<Vec<TimelineEntry>, StoreError>> + Send {
        (**self).list(tenant, request_id)
    }
}
