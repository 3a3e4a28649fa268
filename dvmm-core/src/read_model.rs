//! The request read model: one row per request (status, project, size, VM
//! name, IP, timestamps), kept up by the service like the timeline, so a
//! portal lists a tenant's requests by page without replaying its events.
//!
//! - [`RequestReadModel`] is the port; the memory and PostgreSQL stores
//!   implement it (PostgreSQL under the same row-level security as the
//!   events).
//! - Rows are keyed by request and carry the request stream's version: an
//!   older version never overwrites a newer one, so late or repeated
//!   updates are harmless.
//! - Lists are newest first and paginated by an opaque [`Cursor`], stable
//!   while requests are added.
//! - Rebuildable from the events at any time
//!   (`ProvisioningService::rebuild_read_model`).

use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::EventMetadata;
use crate::ids::{ProjectId, TenantId, VmId, VmRequestId};
use crate::ports::{BoxFuture, StoreError};
use crate::size::VmSize;
use crate::vm_request::{VmRequest, VmRequestEvent, VmRequestStatus};

/// One request as a list shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    /// Tenant.
    pub tenant_id: TenantId,
    /// The request.
    pub request_id: VmRequestId,
    /// Project.
    pub project_id: ProjectId,
    /// Project prefix (first part of the VM name).
    pub project_prefix: String,
    /// The full VM name.
    pub vm_name: String,
    /// Requested size.
    pub size: VmSize,
    /// Status.
    pub status: VmRequestStatus,
    /// The VM of the current attempt, once provisioning started.
    pub vm_id: Option<VmId>,
    /// The guest IP, once ready with one.
    pub ip_address: Option<IpAddr>,
    /// Why it failed or was rejected or cancelled, as recorded.
    pub reason: Option<String>,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// The request stream's version this row reflects.
    pub version: u64,
}

impl RequestSummary {
    /// The row for `request` after `events`, the whole of its stream in
    /// order; `None` for an empty stream.
    pub fn from_stream(
        request: &VmRequest,
        events: &[(EventMetadata, VmRequestEvent)],
    ) -> Option<Self> {
        let (first, _) = events.first()?;
        let (last, _) = events.last()?;
        Some(Self {
            tenant_id: request.tenant_id,
            request_id: request.id,
            project_id: request.project_id,
            project_prefix: request.project_prefix.clone(),
            vm_name: request.vm_name.as_str().to_owned(),
            size: request.size,
            status: request.status,
            vm_id: request.vm_id,
            ip_address: request.result.as_ref().and_then(|r| r.ip_address),
            reason: request
                .failure
                .as_ref()
                .map(|f| f.message.clone())
                .or_else(|| request.reason.clone()),
            created_at: first.occurred_at,
            updated_at: last.occurred_at,
            version: events.len() as u64,
        })
    }

    /// The cursor that continues a list after this row.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created_at: self.created_at,
            request_id: self.request_id,
        }
    }
}

/// What a list keeps; `None` fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only requests with this status.
    pub status: Option<VmRequestStatus>,
    /// Only requests of this project.
    pub project_id: Option<ProjectId>,
}

impl RequestFilter {
    /// Whether `row` passes.
    pub fn matches(&self, row: &RequestSummary) -> bool {
        self.status.is_none_or(|s| s == row.status)
            && self.project_id.is_none_or(|p| p == row.project_id)
    }
}

/// Where a list continues: after the row it was taken from, in the list's
/// order (newest first, ties by request id). Opaque to hosts: pass it
/// back, or as text (`to_string()` / `parse()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    created_at: DateTime<Utc>,
    request_id: VmRequestId,
}

impl Cursor {
    /// Whether `row` comes after this cursor in list order.
    pub fn precedes(&self, row: &RequestSummary) -> bool {
        (row.created_at, row.request_id.as_uuid()) < (self.created_at, self.request_id.as_uuid())
    }

    /// When the row it was taken from was created.
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }

    /// The request of the row it was taken from.
    pub fn request_id(&self) -> VmRequestId {
        self.request_id
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
        f.pad(&format!("{nanos}.{}", self.request_id.as_uuid().simple()))
    }
}

/// A cursor that is not one this crate made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a request list cursor")]
pub struct InvalidCursor;

impl std::str::FromStr for Cursor {
    type Err = InvalidCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (nanos, id) = s.split_once('.').ok_or(InvalidCursor)?;
        let nanos: i64 = nanos.parse().map_err(|_| InvalidCursor)?;
        let id = uuid::Uuid::parse_str(id).map_err(|_| InvalidCursor)?;
        Ok(Self {
            created_at: DateTime::from_timestamp_nanos(nanos),
            request_id: VmRequestId::from_uuid(id),
        })
    }
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The rows, newest first.
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// The request read model. Futures are boxed so a service holds it as a
/// trait object.
pub trait RequestReadModel: Send + Sync {
    /// Stores `row` unless the stored row for its request has a higher (or
    /// the same) version.
    fn upsert<'a>(&'a self, row: RequestSummary) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The tenant's rows that pass `filter`, newest first, after `after`,
    /// at most `limit` (at least one is asked for).
    fn list<'a>(
        &'a self,
        tenant: TenantId,
        filter: &'a RequestFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page<RequestSummary>, StoreError>>;
}

impl<T: RequestReadModel + ?Sized> RequestReadModel for std::sync::Arc<T> {
    fn upsert<'a>(&'a self, row: RequestSummary) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).upsert(row)
    }

    fn list<'a>(
        &'a self,
        tenant: TenantId,
        filter: &'a RequestFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page<RequestSummary>, StoreError>> {
        (**self).list(tenant, filter, after, limit)
    }
}

/// Pages `rows` (any order) as the port does: for adapters that filter in
/// memory, and for the service's fallback without a read model.
pub fn page_of(
    mut rows: Vec<RequestSummary>,
    filter: &RequestFilter,
    after: Option<Cursor>,
    limit: usize,
) -> Page<RequestSummary> {
    rows.retain(|row| filter.matches(row) && after.is_none_or(|c| c.precedes(row)));
    rows.sort_by(|a, b| {
        (b.created_at, b.request_id.as_uuid()).cmp(&(a.created_at, a.request_id.as_uuid()))
    });
    let limit = limit.max(1);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(RequestSummary::cursor)
    } else {
        None
    };
    Page { items: rows, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_as_text_and_reject_garbage() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_nanos(1_800_000_000_123_456_789),
            request_id: VmRequestId::from_uuid(uuid::Uuid::new_v4()),
        };
        assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor));
        for bad in ["", "12", "x.y", "1.not-a-uuid", "1.2.3"] {
            assert_eq!(bad.parse::<Cursor>(), Err(InvalidCursor), "{bad}");
        }
    }
}
