//! [`PgWorkQueue`] and [`PgCheckpoints`]: the runner's ports on PostgreSQL,
//! so that worker processes sharing one database share the work.

use std::fmt;
use std::time::Duration;

use dvmm_core::ids::{TenantId, VmRequestId};
use dvmm_core::ports::{BoxFuture, ClaimAttempt, ClaimHolder, RequestClaims, StoreError};
use dvmm_core::runner::{CheckpointStore, Job, QueueCounts, WorkQueue};
use sqlx::{PgPool, Row};

use crate::error::{backend, corrupt};
use crate::tenant::begin_for_tenant;

/// A [`WorkQueue`] on PostgreSQL, shared by every worker process that uses
/// the same database.
///
/// - A claim takes due rows with `FOR UPDATE SKIP LOCKED`: concurrent
///   claimers skip each other's rows instead of waiting, and no row is
///   handed to two workers. Expired leases come first, so a dead worker's
///   jobs are resumed as soon as their lease ends rather than after the
///   backlog.
/// - A lease is a deadline on the database clock (`now()`), so workers on
///   hosts with skewed clocks agree on when it expired. Once it has, the next
///   claim by any worker takes the job over.
/// - `renew`, `complete`, `retry_later`, `postpone` and `release` act only while the
///   named worker still holds the lease, so a worker that lost its job to a
///   takeover cannot disturb the new holder.
///
/// - `claims` counts the claims since the job was last given back
///   (`retry_later`, `postpone` and `release` reset it), so a count above
///   one means the holders before lost their lease without finishing.
/// - Finished rows stay (a re-read approval is not queued again) until
///   `purge_finished` deletes them.
///
/// The table is not under row-level security: a worker serves every tenant,
/// and a row holds only ids and scheduling state.
#[derive(Clone)]
pub struct PgWorkQueue {
    pool: PgPool,
}

impl fmt::Debug for PgWorkQueue {
    // The pool's connect options hold the password: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgWorkQueue")
            .field("connections", &self.pool.size())
            .finish()
    }
}

/// Seconds as the `double precision` that `make_interval` takes.
fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl PgWorkQueue {
    /// Wraps a pool after checking, with [`crate::verify_app_role`], that its
    /// role is held to the tenant policies, as [`crate::PgEventStore::new`]
    /// does. [`crate::PgEventStore::work_queue`] shares a store's checked
    /// pool without checking again.
    ///
    /// # Errors
    /// [`crate::Error::UnsafeRole`], [`crate::Error::NotAppRole`] or
    /// [`crate::Error::NotMigrated`] from the check, [`crate::Error::Database`]
    /// when the check itself fails.
    pub async fn new(pool: PgPool) -> Result<Self, crate::Error> {
        crate::verify_app_role(&pool).await?;
        Ok(Self { pool })
    }

    /// Wraps a pool without checking its role. For tests and benchmarks, as
    /// [`crate::PgEventStore::new_allowing_unsafe_role`].
    pub fn new_allowing_unsafe_role(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The requests whose lease `worker` holds right now (expired or not).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the query fails.
    pub async fn held_by(&self, worker: &str) -> Result<Vec<VmRequestId>, StoreError> {
        let operation = "list a worker's leases";
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT request_id FROM dvmm_jobs WHERE state = 'leased' AND worker = $1 ORDER BY request_id",
        )
        .bind(worker)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| backend(operation, e))?;
        Ok(ids.into_iter().map(VmRequestId::from_uuid).collect())
    }

    /// Runs an update that applies only while `worker` holds the lease on
    /// `request_id`; `true` when it applied. `set` may use `$3`, the delay
    /// in seconds, when one is given.
    async fn update_held(
        &self,
        operation: &'static str,
        set: &'static str,
        worker: &str,
        request_id: VmRequestId,
        delay: Option<Duration>,
    ) -> Result<bool, StoreError> {
        // `set` is one of the constant clauses below, never caller input.
        let sql = format!(
            "UPDATE dvmm_jobs SET {set}, updated_at = now() \
             WHERE request_id = $1 AND state = 'leased' AND worker = $2"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(request_id.as_uuid())
            .bind(worker);
        if let Some(delay) = delay {
            query = query.bind(seconds(delay));
        }
        let result = query
            .execute(&self.pool)
            .await
            .map_err(|e| backend(operation, e))?;
        Ok(result.rows_affected() == 1)
    }
}

impl WorkQueue for PgWorkQueue {
    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        let operation = "count the work queue";
        // One pass over the table, on the database clock like the leases.
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE state = 'queued' AND due_at <= now()), \
                    count(*) FILTER (WHERE state = 'queued' AND due_at > now()), \
                    count(*) FILTER (WHERE state = 'leased' AND due_at > now()), \
                    count(*) FILTER (WHERE state = 'leased' AND due_at <= now()), \
                    count(*) FILTER (WHERE state = 'done') \
               FROM dvmm_jobs",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| backend(operation, e))?;
        let get = |i: usize| -> Result<u64, StoreError> {
            let n: i64 = row.try_get(i).map_err(|e| backend(operation, e))?;
            u64::try_from(n).map_err(|_| corrupt(operation, format!("negative count {n}")))
        };
        Ok(QueueCounts {
            queued: get(0)?,
            waiting: get(1)?,
            leased: get(2)?,
            expired: get(3)?,
            done: get(4)?,
        })
    }

    async fn enqueue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dvmm_jobs (request_id, tenant_id, state, due_at) \
             VALUES ($1, $2, 'queued', now()) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(request_id.as_uuid())
        .bind(tenant.as_uuid())
        .execute(&self.pool)
        .await
        .map_err(|e| backend("queue a provisioning job", e))?;
        Ok(())
    }

    async fn requeue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dvmm_jobs (request_id, tenant_id, state, due_at) \
             VALUES ($1, $2, 'queued', now()) \
             ON CONFLICT (request_id) DO UPDATE \
                SET state = 'queued', due_at = now(), worker = NULL, attempts = 0, claims = 0, \
                    updated_at = now() \
              WHERE dvmm_jobs.state = 'done'",
        )
        .bind(request_id.as_uuid())
        .bind(tenant.as_uuid())
        .execute(&self.pool)
        .await
        .map_err(|e| backend("queue a retried provisioning job", e))?;
        Ok(())
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        let operation = "claim provisioning jobs";
        if max == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "WITH expired AS ( \
                 SELECT request_id FROM dvmm_jobs \
                 WHERE state = 'leased' AND due_at <= now() \
                 ORDER BY due_at LIMIT $2 \
                 FOR UPDATE SKIP LOCKED), \
             queued AS ( \
                 SELECT request_id FROM dvmm_jobs \
                 WHERE state = 'queued' AND due_at <= now() \
                 ORDER BY due_at LIMIT $2 \
                 FOR UPDATE SKIP LOCKED), \
             due AS ( \
                 SELECT request_id FROM expired \
                 UNION ALL SELECT request_id FROM queued \
                 LIMIT $2) \
             UPDATE dvmm_jobs AS j \
                SET state = 'leased', worker = $1, \
                    due_at = now() + make_interval(secs => $3), \
                    claims = j.claims + 1, updated_at = now() \
               FROM due WHERE j.request_id = due.request_id \
             RETURNING j.tenant_id, j.request_id, j.attempts, j.claims",
        )
        .bind(worker)
        .bind(limit)
        .bind(seconds(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| backend(operation, e))?;
        rows.into_iter()
            .map(|row| {
                let tenant: uuid::Uuid = row.try_get(0).map_err(|e| backend(operation, e))?;
                let request: uuid::Uuid = row.try_get(1).map_err(|e| backend(operation, e))?;
                let attempts: i32 = row.try_get(2).map_err(|e| backend(operation, e))?;
                let claims: i32 = row.try_get(3).map_err(|e| backend(operation, e))?;
                Ok(Job {
                    tenant_id: TenantId::from_uuid(tenant),
                    request_id: VmRequestId::from_uuid(request),
                    attempts: u32::try_from(attempts).map_err(|_| {
                        corrupt(operation, format!("negative attempt count {attempts}"))
                    })?,
                    claims: u32::try_from(claims).map_err(|_| {
                        corrupt(operation, format!("negative claim count {claims}"))
                    })?,
                })
            })
            .collect()
    }

    async fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.update_held(
            "renew a lease",
            "due_at = now() + make_interval(secs => $3)",
            worker,
            request_id,
            Some(lease),
        )
        .await
    }

    async fn complete(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        self.update_held(
            "complete a job",
            "state = 'done', due_at = NULL, worker = NULL",
            worker,
            request_id,
            None,
        )
        .await
        .map(drop)
    }

    async fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.update_held(
            "reschedule a job",
            "state = 'queued', worker = NULL, attempts = attempts + 1, claims = 0, \
             due_at = now() + make_interval(secs => $3)",
            worker,
            request_id,
            Some(delay),
        )
        .await
        .map(drop)
    }

    async fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        // `retry_later` without the attempt: waiting for an unreachable
        // vCenter is not the request's fault.
        self.update_held(
            "postpone a job",
            "state = 'queued', worker = NULL, claims = 0, \
             due_at = now() + make_interval(secs => $3)",
            worker,
            request_id,
            Some(delay),
        )
        .await
        .map(drop)
    }

    async fn release(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        self.update_held(
            "release a job",
            "state = 'queued', worker = NULL, claims = 0, due_at = now()",
            worker,
            request_id,
            None,
        )
        .await
        .map(drop)
    }

    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        // `updated_at` of a done row is when it was completed: nothing
        // updates a done row afterwards. The database clock decides, as it
        // does for leases.
        let result = sqlx::query(
            "DELETE FROM dvmm_jobs \
             WHERE state = 'done' AND updated_at <= now() - make_interval(secs => $1)",
        )
        .bind(seconds(older_than))
        .execute(&self.pool)
        .await
        .map_err(|e| backend("purge finished jobs", e))?;
        Ok(result.rows_affected())
    }
}

/// A request's claim is its job row's lease, so every runner and every
/// service configured with this queue (`ProvisioningService::with_claims`)
/// share one claim per request: a direct caller leases the job (adding the
/// row when the feed has not yet), and a runner cannot claim it meanwhile.
/// Expiry is on the database clock, as for the runner's leases.
impl RequestClaims for PgWorkQueue {
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>> {
        Box::pin(async move {
            let operation = "claim a request";
            let mut tx = self.pool.begin().await.map_err(|e| backend(operation, e))?;
            sqlx::query(
                "INSERT INTO dvmm_jobs (request_id, tenant_id, state, due_at) \
                 VALUES ($1, $2, 'queued', now()) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(request_id.as_uuid())
            .bind(tenant.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(|e| backend(operation, e))?;
            // The row lock orders concurrent claimers: the second one sees
            // the first one's lease.
            let row = sqlx::query(
                "SELECT state, worker, due_at, due_at > now() FROM dvmm_jobs \
                 WHERE request_id = $1 FOR UPDATE",
            )
            .bind(request_id.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| backend(operation, e))?;
            let state: String = row.try_get(0).map_err(|e| backend(operation, e))?;
            let worker: Option<String> = row.try_get(1).map_err(|e| backend(operation, e))?;
            let due: Option<chrono::DateTime<chrono::Utc>> =
                row.try_get(2).map_err(|e| backend(operation, e))?;
            let live: Option<bool> = row.try_get(3).map_err(|e| backend(operation, e))?;
            let mine = worker.as_deref() == Some(holder);
            if state == "leased" && live == Some(true) && !mine {
                tx.commit().await.map_err(|e| backend(operation, e))?;
                return Ok(ClaimAttempt::HeldBy(ClaimHolder {
                    holder: worker.unwrap_or_default(),
                    until: due.unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
                }));
            }
            let reentered = state == "leased" && live == Some(true) && mine;
            let until: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
                "UPDATE dvmm_jobs SET state = 'leased', worker = $2, \
                        due_at = now() + make_interval(secs => $3), \
                        claims = claims + CASE WHEN $4 THEN 0 ELSE 1 END, updated_at = now() \
                  WHERE request_id = $1 RETURNING due_at",
            )
            .bind(request_id.as_uuid())
            .bind(holder)
            .bind(seconds(lease))
            .bind(reentered)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| backend(operation, e))?;
            tx.commit().await.map_err(|e| backend(operation, e))?;
            Ok(if reentered {
                ClaimAttempt::AlreadyHeld { until }
            } else {
                ClaimAttempt::Acquired { until }
            })
        })
    }

    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.renew(holder, request_id, lease))
    }

    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if finished {
                self.complete(holder, request_id).await
            } else {
                self.release(holder, request_id).await
            }
        })
    }
}

/// A [`CheckpointStore`] on PostgreSQL, under the same tenant row-level
/// security as the events. Saving keeps the highest position, so workers
/// sharing a checkpoint name never move it backwards.
#[derive(Clone)]
pub struct PgCheckpoints {
    pool: PgPool,
}

impl fmt::Debug for PgCheckpoints {
    // The pool's connect options hold the password: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCheckpoints")
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl PgCheckpoints {
    /// Wraps a pool after checking its role, as [`PgWorkQueue::new`];
    /// [`crate::PgEventStore::checkpoints`] shares a store's checked pool.
    /// Checkpoints are read and written under the tenant policies, so a role
    /// that escapes them is refused here as in the event store.
    ///
    /// # Errors
    /// As [`PgWorkQueue::new`].
    pub async fn new(pool: PgPool) -> Result<Self, crate::Error> {
        crate::verify_app_role(&pool).await?;
        Ok(Self { pool })
    }

    /// Wraps a pool without checking its role. For tests and benchmarks, as
    /// [`crate::PgEventStore::new_allowing_unsafe_role`].
    pub fn new_allowing_unsafe_role(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl CheckpointStore for PgCheckpoints {
    async fn load(&self, name: &str, tenant: TenantId) -> Result<u64, StoreError> {
        let operation = "load a checkpoint";
        let mut tx = begin_for_tenant(&self.pool, tenant, operation).await?;
        let position: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM dvmm_checkpoints WHERE name = $1 AND tenant_id = $2",
        )
        .bind(name)
        .bind(tenant.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| backend(operation, e))?;
        tx.commit().await.map_err(|e| backend(operation, e))?;
        let position = position.unwrap_or(0);
        u64::try_from(position)
            .map_err(|_| corrupt(operation, format!("negative checkpoint {position}")))
    }

    async fn save(&self, name: &str, tenant: TenantId, position: u64) -> Result<(), StoreError> {
        let operation = "save a checkpoint";
        let position = i64::try_from(position).map_err(|_| StoreError::Backend {
            operation,
            message: format!("position {position} does not fit a bigint"),
            retryable: false,
            source: None,
        })?;
        let mut tx = begin_for_tenant(&self.pool, tenant, operation).await?;
        sqlx::query(
            "INSERT INTO dvmm_checkpoints (name, tenant_id, position) VALUES ($1, $2, $3) \
             ON CONFLICT (name, tenant_id) DO UPDATE \
               SET position = GREATEST(dvmm_checkpoints.position, EXCLUDED.position), \
                   updated_at = now()",
        )
        .bind(name)
        .bind(tenant.as_uuid())
        .bind(position)
        .execute(&mut *tx)
        .await
        .map_err(|e| backend(operation, e))?;
        tx.commit().await.map_err(|e| backend(operation, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_fractional_seconds() {
        assert_eq!(seconds(Duration::from_millis(1500)), 1.5);
        assert_eq!(seconds(Duration::ZERO), 0.0);
    }
}
