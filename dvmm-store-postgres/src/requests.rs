//! [`PgRequests`]: the request read model on PostgreSQL (migration 11).

use std::fmt;

use chrono::{DateTime, Duration, Timelike, Utc};
use dvmm_core::ids::{ProjectId, TenantId, VmId, VmRequestId};
use dvmm_core::ports::{BoxFuture, StoreError};
use dvmm_core::read_model::{Cursor, Page, RequestFilter, RequestReadModel, RequestSummary};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::error::{backend, corrupt};
use crate::tenant::begin_for_tenant;

/// The request read model on PostgreSQL: one row per request in
/// `dvmm_requests`, under the tenant policy like the events. Get one from
/// [`crate::PgEventStore::requests`] (sharing the store's checked pool).
#[derive(Clone)]
pub struct PgRequests {
    pool: PgPool,
}

impl fmt::Debug for PgRequests {
    // The pool's connect options hold the password: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRequests")
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl PgRequests {
    /// Wraps a pool after checking its role, as [`crate::PgEventStore::new`].
    ///
    /// # Errors
    /// As [`crate::PgWorkQueue::new`].
    pub async fn new(pool: PgPool) -> Result<Self, crate::Error> {
        crate::verify_app_role(&pool).await?;
        Ok(Self { pool })
    }

    /// Wraps a pool without checking its role (tests and benchmarks).
    pub fn new_allowing_unsafe_role(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// `timestamptz` keeps microseconds; the nanoseconds below go alongside.
fn split(at: DateTime<Utc>) -> (DateTime<Utc>, i32) {
    let below = at.nanosecond() % 1_000;
    (
        at - Duration::nanoseconds(i64::from(below)),
        i32::try_from(below).unwrap_or(0),
    )
}

fn join(at: DateTime<Utc>, nanos: i32) -> DateTime<Utc> {
    at + Duration::nanoseconds(i64::from(nanos))
}

fn status_text(status: dvmm_core::VmRequestStatus) -> String {
    status.to_string()
}

fn row_of(row: &PgRow, operation: &'static str) -> Result<RequestSummary, StoreError> {
    let get = |e| backend(operation, e);
    let status: String = row.try_get("status").map_err(get)?;
    let size: String = row.try_get("size").map_err(get)?;
    let ip: Option<String> = row.try_get("ip_address").map_err(get)?;
    let version: i64 = row.try_get("version").map_err(get)?;
    Ok(RequestSummary {
        tenant_id: TenantId::from_uuid(row.try_get("tenant_id").map_err(get)?),
        request_id: VmRequestId::from_uuid(row.try_get("request_id").map_err(get)?),
        project_id: ProjectId::from_uuid(row.try_get("project_id").map_err(get)?),
        project_prefix: row.try_get("project_prefix").map_err(get)?,
        vm_name: row.try_get("vm_name").map_err(get)?,
        size: size
            .parse()
            .map_err(|_| corrupt(operation, format!("unknown size {size:?}")))?,
        status: serde_json::from_value(serde_json::Value::String(status.clone()))
            .map_err(|_| corrupt(operation, format!("unknown status {status:?}")))?,
        vm_id: row
            .try_get::<Option<uuid::Uuid>, _>("vm_id")
            .map_err(get)?
            .map(VmId::from_uuid),
        ip_address: ip
            .map(|ip| {
                ip.parse()
                    .map_err(|_| corrupt(operation, format!("bad IP address {ip:?}")))
            })
            .transpose()?,
        reason: row.try_get("reason").map_err(get)?,
        created_at: join(
            row.try_get("created_at").map_err(get)?,
            row.try_get("created_nanos").map_err(get)?,
        ),
        updated_at: join(
            row.try_get("updated_at").map_err(get)?,
            row.try_get("updated_nanos").map_err(get)?,
        ),
        version: u64::try_from(version)
            .map_err(|_| corrupt(operation, format!("negative version {version}")))?,
    })
}

impl RequestReadModel for PgRequests {
    fn upsert<'a>(&'a self, row: RequestSummary) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let operation = "update the request read model";
            let (created_at, created_nanos) = split(row.created_at);
            let (updated_at, updated_nanos) = split(row.updated_at);
            let version = i64::try_from(row.version)
                .map_err(|_| corrupt(operation, "version beyond i64".into()))?;
            let mut tx = begin_for_tenant(&self.pool, row.tenant_id, operation).await?;
            sqlx::query(
                "INSERT INTO dvmm_requests (tenant_id, request_id, project_id, project_prefix, \
                     vm_name, size, status, vm_id, ip_address, reason, created_at, created_nanos, \
                     updated_at, updated_nanos, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (tenant_id, request_id) DO UPDATE SET \
                     project_id = EXCLUDED.project_id, project_prefix = EXCLUDED.project_prefix, \
                     vm_name = EXCLUDED.vm_name, size = EXCLUDED.size, status = EXCLUDED.status, \
                     vm_id = EXCLUDED.vm_id, ip_address = EXCLUDED.ip_address, \
                     reason = EXCLUDED.reason, created_at = EXCLUDED.created_at, \
                     created_nanos = EXCLUDED.created_nanos, updated_at = EXCLUDED.updated_at, \
                     updated_nanos = EXCLUDED.updated_nanos, version = EXCLUDED.version \
                 WHERE dvmm_requests.version < EXCLUDED.version \
                   AND dvmm_requests.tenant_id = $1",
            )
            .bind(row.tenant_id.as_uuid())
            .bind(row.request_id.as_uuid())
            .bind(row.project_id.as_uuid())
            .bind(&row.project_prefix)
            .bind(&row.vm_name)
            .bind(row.size.as_str())
            .bind(status_text(row.status))
            .bind(row.vm_id.map(|id| id.as_uuid()))
            .bind(row.ip_address.map(|ip| ip.to_string()))
            .bind(&row.reason)
            .bind(created_at)
            .bind(created_nanos)
            .bind(updated_at)
            .bind(updated_nanos)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| backend(operation, e))?;
            tx.commit().await.map_err(|e| backend(operation, e))
        })
    }

    fn list<'a>(
        &'a self,
        tenant: TenantId,
        filter: &'a RequestFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page<RequestSummary>, StoreError>> {
        Box::pin(async move {
            let operation = "list requests";
            let limit = limit.clamp(1, 10_000);
            let (after_at, after_nanos) = after.map(|c| split(c.created_at())).unzip();
            let mut tx = begin_for_tenant(&self.pool, tenant, operation).await?;
            let rows = sqlx::query(
                "SELECT * FROM dvmm_requests \
                 WHERE tenant_id = $1 \
                   AND ($2::text IS NULL OR status = $2) \
                   AND ($3::uuid IS NULL OR project_id = $3) \
                   AND ($4::timestamptz IS NULL \
                        OR (created_at, created_nanos, request_id) < ($4, $5, $6)) \
                 ORDER BY created_at DESC, created_nanos DESC, request_id DESC \
                 LIMIT $7",
            )
            .bind(tenant.as_uuid())
            .bind(filter.status.map(status_text))
            .bind(filter.project_id.map(|p| p.as_uuid()))
            .bind(after_at)
            .bind(after_nanos)
            .bind(after.map(|c| c.request_id().as_uuid()))
            .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| backend(operation, e))?;
            tx.commit().await.map_err(|e| backend(operation, e))?;
            let mut items = rows
                .iter()
                .map(|r| row_of(r, operation))
                .collect::<Result<Vec<_>, _>>()?;
            let more = items.len() > limit;
            items.truncate(limit);
            let next = if more {
                items.last().map(RequestSummary::cursor)
            } else {
                None
            };
            Ok(Page { items, next })
        })
    }
}
