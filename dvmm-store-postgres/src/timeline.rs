//! [`PgTimeline`]: the [`TimelineSink`] port on PostgreSQL.

use std::fmt;

use chrono::{DateTime, Duration, Timelike, Utc};
use dvmm_core::event::StreamId;
use dvmm_core::ids::{EventId, TenantId, VmRequestId};
use dvmm_core::ports::{StoreError, TimelineSink};
use dvmm_core::timeline::{TimelineEntry, TimelineEntryType, TimelineFields};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, backend, corrupt, sqlstate};
use crate::schema::verify_app_role;
use crate::tenant::begin_for_tenant;

/// A [`TimelineSink`] on PostgreSQL: one row per entry in `dvmm_timeline`,
/// under the same row-level security as the events.
#[derive(Clone)]
pub struct PgTimeline {
    pool: PgPool,
}

impl fmt::Debug for PgTimeline {
    // The pool's connect options hold the password: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTimeline")
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl PgTimeline {
    /// Wraps a pool after checking, with [`verify_app_role`], that its role
    /// is held to the tenant policies (see [`crate::PgEventStore::new`]).
    ///
    /// # Errors
    /// [`Error::UnsafeRole`] or [`Error::NotMigrated`] from the check,
    /// [`Error::Database`] when the check itself fails.
    pub async fn new(pool: PgPool) -> Result<Self, Error> {
        verify_app_role(&pool).await?;
        Ok(Self { pool })
    }

    /// Wraps a pool without checking its role; row-level security may then
    /// not apply. For tests and benchmarks, as
    /// [`crate::PgEventStore::new_allowing_unsafe_role`].
    pub fn new_allowing_unsafe_role(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Splits a timestamp into what `timestamptz` keeps (microseconds) and the
/// nanoseconds below that.
fn split_nanos(at: DateTime<Utc>) -> (DateTime<Utc>, i32) {
    let below_micro = at.nanosecond() % 1_000;
    let micros = at - Duration::nanoseconds(i64::from(below_micro));
    (micros, below_micro as i32)
}

impl TimelineSink for PgTimeline {
    async fn record(&self, entry: TimelineEntry) -> Result<(), StoreError> {
        let operation = "record a timeline entry";
        let (occurred_at, nanos) = split_nanos(entry.occurred_at);
        let mut tx = begin_for_tenant(&self.pool, entry.tenant_id, operation).await?;
        let inserted = sqlx::query(
            "INSERT INTO dvmm_timeline \
               (event_id, tenant_id, request_id, entry_type, details, occurred_at, occurred_at_nanos, fields) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(entry.event_id.as_uuid())
        .bind(entry.tenant_id.as_uuid())
        .bind(entry.request_id.as_uuid())
        .bind(entry.entry_type.as_str())
        .bind(&entry.details)
        .bind(occurred_at)
        .bind(nanos)
        .bind(sqlx::types::Json(&entry.fields))
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => tx.commit().await.map_err(|e| backend(operation, e)),
            Err(e) if sqlstate(&e).is_some_and(|c| c.starts_with("22")) => {
                Err(StoreError::InvalidAppend {
                    stream: StreamId::new("VmRequest", entry.request_id),
                    reason: format!("PostgreSQL cannot store this timeline entry: {e}"),
                })
            }
            Err(e) => Err(backend(operation, e)),
        }
    }

    async fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let operation = "list a request's timeline";
        let mut tx = begin_for_tenant(&self.pool, tenant, operation).await?;
        let rows = sqlx::query(
            "SELECT event_id, entry_type, details, occurred_at, occurred_at_nanos, fields \
               FROM dvmm_timeline \
              WHERE tenant_id = $1 AND request_id = $2 \
              ORDER BY occurred_at, occurred_at_nanos, seq",
        )
        .bind(tenant.as_uuid())
        .bind(request_id.as_uuid())
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| backend(operation, e))?;
        tx.commit().await.map_err(|e| backend(operation, e))?;
        rows.iter()
            .map(|row| {
                let get = |e| backend(operation, e);
                let entry_type: String = row.try_get("entry_type").map_err(get)?;
                let entry_type = TimelineEntryType::parse(&entry_type).ok_or_else(|| {
                    corrupt(
                        operation,
                        format!("unknown timeline entry type {entry_type:?} stored"),
                    )
                })?;
                let occurred_at: DateTime<Utc> = row.try_get("occurred_at").map_err(get)?;
                let nanos: i32 = row.try_get("occurred_at_nanos").map_err(get)?;
                Ok(TimelineEntry {
                    event_id: EventId::from_uuid(row.try_get::<Uuid, _>("event_id").map_err(get)?),
                    tenant_id: tenant,
                    request_id,
                    entry_type,
                    details: row.try_get("details").map_err(get)?,
                    occurred_at: occurred_at + Duration::nanoseconds(i64::from(nanos)),
                    fields: row
                        .try_get::<sqlx::types::Json<TimelineFields>, _>("fields")
                        .map_err(get)?
                        .0,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn nanoseconds_below_a_microsecond_are_split_off_and_restored() {
        let at = Utc
            .timestamp_opt(1_767_225_600, 123_456_789)
            .single()
            .unwrap();
        let (micros, nanos) = split_nanos(at);
        assert_eq!(micros.nanosecond(), 123_456_000);
        assert_eq!(nanos, 789);
        assert_eq!(micros + Duration::nanoseconds(i64::from(nanos)), at);

        let before_epoch = Utc.timestamp_opt(-5, 999_999_999).single().unwrap();
        let (micros, nanos) = split_nanos(before_epoch);
        assert_eq!(nanos, 999);
        assert_eq!(
            micros + Duration::nanoseconds(i64::from(nanos)),
            before_epoch
        );
    }
}
