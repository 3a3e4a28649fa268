//! [`PgEventStore`]: the [`EventStore`] port on PostgreSQL.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dvmm_core::event::{EventMetadata, NewEvent, StoredEvent, StreamId};
use dvmm_core::ids::{EventId, TenantId};
use dvmm_core::ports::{AppendOutcome, EventStore, StoreError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, Result, UNIQUE_VIOLATION, backend, corrupt, sqlstate};
use crate::queue::{PgCheckpoints, PgWorkQueue};
use crate::schema::verify_app_role;
use crate::timeline::PgTimeline;

/// An [`EventStore`] on PostgreSQL.
///
/// Cheap to clone (it is a handle to a connection pool). Every call runs in
/// its own transaction scoped to the caller's tenant, see the crate docs for
/// the ordering and isolation designs.
#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
}

impl fmt::Debug for PgEventStore {
    // The pool's connect options hold the password: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEventStore")
            .field("connections", &self.pool.size())
            .field("idle", &self.pool.num_idle())
            .finish()
    }
}

impl PgEventStore {
    /// Wraps an existing pool after checking, with [`verify_app_role`], that
    /// its role is held to the tenant policies: not a superuser, no
    /// `BYPASSRLS`, not the tables' owner.
    ///
    /// # Errors
    /// [`Error::UnsafeRole`] or [`Error::NotMigrated`] from the check,
    /// [`Error::Database`] when the check itself fails.
    pub async fn new(pool: PgPool) -> Result<Self> {
        verify_app_role(&pool).await?;
        Ok(Self { pool })
    }

    /// Wraps a pool without checking its role, so a superuser, a `BYPASSRLS`
    /// role or the tables' owner may run the store. Row-level security then
    /// does not apply; only the tenant filters of the SQL functions keep
    /// tenants apart, and raw SQL through [`PgEventStore::pool`] sees every
    /// tenant. Meant for tests and benchmarks that need such a pool; an
    /// application uses [`PgEventStore::new`] or [`PgEventStore::connect`].
    pub fn new_allowing_unsafe_role(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connects to `url` (e.g. `postgres://app:secret@db/dvmm`) with a pool
    /// of up to 10 connections and checks that the role is held to the
    /// tenant policies.
    ///
    /// # Errors
    /// [`Error::Connect`] when the database cannot be reached,
    /// [`Error::NotMigrated`] or [`Error::UnsafeRole`] from the role check.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse().map_err(|source| Error::Connect { source })?;
        Self::connect_with(Self::default_pool_options(), options).await
    }

    /// Connects with explicit pool and connection options and checks that
    /// the role is held to the tenant policies.
    ///
    /// # Errors
    /// As [`PgEventStore::connect`].
    pub async fn connect_with(pool: PgPoolOptions, options: PgConnectOptions) -> Result<Self> {
        let pool = pool
            .connect_with(options)
            .await
            .map_err(|source| Error::Connect { source })?;
        Self::new(pool).await
    }

    /// The pool options [`PgEventStore::connect`] uses: 10 connections, and a
    /// 10 s limit on waiting for one (which also bounds how long a call waits
    /// for a restarting server before it fails with a retryable error).
    pub fn default_pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A [`PgTimeline`] sharing this store's pool (and therefore the check
    /// its role passed, or the opt-in that skipped it).
    pub fn timeline(&self) -> PgTimeline {
        PgTimeline::new_allowing_unsafe_role(self.pool.clone())
    }

    /// A [`PgWorkQueue`] sharing this store's pool (and the check its role
    /// passed, or the opt-in that skipped it).
    pub fn work_queue(&self) -> PgWorkQueue {
        PgWorkQueue::new_allowing_unsafe_role(self.pool.clone())
    }

    /// The request read model ([`crate::PgRequests`]) sharing this store's
    /// pool (and the check its role passed, or the opt-in that skipped it).
    pub fn requests(&self) -> crate::PgRequests {
        crate::PgRequests::new_allowing_unsafe_role(self.pool.clone())
    }

    /// [`PgCheckpoints`] sharing this store's pool (and the check its role
    /// passed, or the opt-in that skipped it).
    pub fn checkpoints(&self) -> PgCheckpoints {
        PgCheckpoints::new_allowing_unsafe_role(self.pool.clone())
    }
}

/// PostgreSQL `text` cannot hold NUL, so such ids cannot name a stored stream.
fn has_nul(stream: &StreamId) -> bool {
    stream.stream_type.contains('\0') || stream.id.contains('\0')
}

fn invalid(stream: &StreamId, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidAppend {
        stream: stream.clone(),
        reason: reason.into(),
    }
}

/// Refuses batches that can never be stored, before touching the database.
fn check_batch(tenant: TenantId, stream: &StreamId, events: &[NewEvent]) -> Result<(), StoreError> {
    if has_nul(stream) {
        return Err(invalid(stream, "the stream id contains a NUL character"));
    }
    if let Some(bad) = events.iter().find(|e| e.metadata.tenant_id != tenant) {
        return Err(invalid(
            stream,
            format!(
                "event {} belongs to tenant {}, not {tenant}",
                bad.metadata.event_id, bad.metadata.tenant_id
            ),
        ));
    }
    let mut ids = HashSet::with_capacity(events.len());
    if let Some(dup) = events.iter().find(|e| !ids.insert(e.metadata.event_id)) {
        return Err(invalid(
            stream,
            format!("the batch repeats event id {}", dup.metadata.event_id),
        ));
    }
    if let Some(bad) = events.iter().find(|e| e.event_type.contains('\0')) {
        return Err(invalid(
            stream,
            format!(
                "event {} has a NUL character in its type",
                bad.metadata.event_id
            ),
        ));
    }
    Ok(())
}

fn to_u64(value: i64, what: &str, operation: &'static str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(operation, format!("negative {what} {value} stored")))
}

/// A batch as the column arrays `dvmm_append` takes.
struct Columns {
    ids: Vec<Uuid>,
    types: Vec<String>,
    schema_versions: Vec<i64>,
    payloads: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

impl Columns {
    fn new(events: Vec<NewEvent>) -> Self {
        let n = events.len();
        let mut columns = Columns {
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        };
        for event in events {
            columns.ids.push(event.metadata.event_id.as_uuid());
            columns.metadata.push(metadata_json(&event.metadata));
            columns.types.push(event.event_type);
            columns
                .schema_versions
                .push(i64::from(event.schema_version));
            columns.payloads.push(event.payload);
        }
        columns
    }
}

/// What `dvmm_append` answered.
struct AppendRow {
    outcome: String,
    stream_version: i64,
    last_position: Option<i64>,
}

/// One call of the migration's `dvmm_append` (`check_ids` asks for the full
/// check of version and known ids up front): checks, position lock, insert
/// and (implicit) commit in a single round trip.
async fn call_append(
    pool: &PgPool,
    tenant: TenantId,
    stream: &StreamId,
    expected: i64,
    columns: &Columns,
    check_ids: bool,
) -> Result<AppendRow, sqlx::Error> {
    let row = sqlx::query(
        "SELECT outcome, stream_version, last_position \
           FROM dvmm_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(tenant.as_uuid())
    .bind(&stream.stream_type)
    .bind(&stream.id)
    .bind(expected)
    .bind(&columns.ids)
    .bind(&columns.types)
    .bind(&columns.schema_versions)
    .bind(&columns.payloads)
    .bind(&columns.metadata)
    .bind(check_ids)
    .fetch_one(pool)
    .await?;
    Ok(AppendRow {
        outcome: row.try_get(0)?,
        stream_version: row.try_get(1)?,
        last_position: row.try_get(2)?,
    })
}

fn metadata_json(metadata: &EventMetadata) -> serde_json::Value {
    // EventMetadata is plain ids, an optional id and a timestamp: it always
    // serializes; Null would be refused by the NOT NULL column anyway.
    serde_json::to_value(metadata).unwrap_or(serde_json::Value::Null)
}

/// The columns `dvmm_load` and `dvmm_read_all` return (migration 5): the
/// metadata comes as its own columns, not as one JSONB document.
const EVENT_COLUMNS: &str = "position, stream_type, stream_id, version, event_type, \
                             schema_version, payload, event_id, tenant_id, user_id, \
                             correlation_id, causation_id, occurred_at";

/// The four metadata fields the readers take out of the stored document, as
/// the text `->>` gives (`None` for a missing key or a JSON `null`).
struct MetadataText<'r> {
    user_id: Option<&'r str>,
    correlation_id: Option<&'r str>,
    causation_id: Option<&'r str>,
    occurred_at: Option<&'r str>,
}

/// Rebuilds an event's metadata from its id and tenant columns and the text
/// of the other fields; says which field is missing or malformed.
fn metadata_from_columns(
    event_id: Uuid,
    tenant_id: Uuid,
    text: &MetadataText<'_>,
) -> std::result::Result<EventMetadata, String> {
    fn required<'r>(value: Option<&'r str>, field: &str) -> std::result::Result<&'r str, String> {
        value.ok_or_else(|| format!("{field} is missing"))
    }
    fn parsed<T: std::str::FromStr>(value: &str, field: &str) -> std::result::Result<T, String>
    where
        T::Err: fmt::Display,
    {
        value
            .parse()
            .map_err(|e| format!("{field} {value:?} is malformed: {e}"))
    }
    Ok(EventMetadata {
        event_id: EventId::from_uuid(event_id),
        tenant_id: TenantId::from_uuid(tenant_id),
        user_id: parsed(required(text.user_id, "user_id")?, "user_id")?,
        correlation_id: parsed(
            required(text.correlation_id, "correlation_id")?,
            "correlation_id",
        )?,
        causation_id: text
            .causation_id
            .map(|id| parsed(id, "causation_id"))
            .transpose()?,
        occurred_at: parsed::<DateTime<Utc>>(
            required(text.occurred_at, "occurred_at")?,
            "occurred_at",
        )?,
    })
}

/// One row of `dvmm_load`/`dvmm_read_all`, read by column index in the order
/// of [`EVENT_COLUMNS`].
fn stored_event(row: &PgRow, operation: &'static str) -> Result<StoredEvent, StoreError> {
    let get = |e| backend(operation, e);
    let position: i64 = row.try_get(0).map_err(get)?;
    let version: i64 = row.try_get(3).map_err(get)?;
    let schema_version: i64 = row.try_get(5).map_err(get)?;
    let text = MetadataText {
        user_id: row.try_get(9).map_err(get)?,
        correlation_id: row.try_get(10).map_err(get)?,
        causation_id: row.try_get(11).map_err(get)?,
        occurred_at: row.try_get(12).map_err(get)?,
    };
    let metadata = metadata_from_columns(
        row.try_get(7).map_err(get)?,
        row.try_get(8).map_err(get)?,
        &text,
    )
    .map_err(|e| {
        corrupt(
            operation,
            format!("the metadata of the event at position {position} is malformed: {e}"),
        )
    })?;
    Ok(StoredEvent {
        position: to_u64(position, "position", operation)?,
        stream_id: StreamId {
            stream_type: row.try_get(1).map_err(get)?,
            id: row.try_get(2).map_err(get)?,
        },
        version: to_u64(version, "version", operation)?,
        event_type: row.try_get(4).map_err(get)?,
        schema_version: u32::try_from(schema_version).map_err(|_| {
            corrupt(
                operation,
                format!("schema version {schema_version} at position {position} is out of range"),
            )
        })?,
        payload: row.try_get(6).map_err(get)?,
        metadata,
    })
}

impl EventStore for PgEventStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        check_batch(tenant, stream, &events)?;
        let columns = Columns::new(events);
        // An expected version beyond bigint cannot match any stream.
        let expected = i64::try_from(expected_version).unwrap_or(-1);
        // The common case reads only the stream's version (migration 6).
        let mut result = call_append(&self.pool, tenant, stream, expected, &columns, false).await;
        if result.as_ref().is_err_and(is_unique_violation) {
            // Lost a race on a unique key, or the batch holds an id that is
            // already stored; nothing was written. Asking again with the full
            // check tells a retry of this very batch (already applied) from a
            // writer that took the version or a reused id (conflict).
            result = call_append(&self.pool, tenant, stream, expected, &columns, true).await;
        }
        match result {
            Ok(row) => {
                let version = to_u64(row.stream_version, "version", "append")?;
                match row.outcome.as_str() {
                    "appended" => Ok(AppendOutcome::Appended {
                        new_version: version,
                        last_position: to_u64(
                            row.last_position.unwrap_or(0),
                            "position",
                            "append",
                        )?,
                    }),
                    "already_applied" => Ok(AppendOutcome::AlreadyApplied {
                        stream_version: version,
                    }),
                    "conflict" => {
                        tracing::debug!(%stream, expected_version, found = version, "append conflict");
                        Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected: expected_version,
                            actual: Some(version),
                        })
                    }
                    other => Err(corrupt(
                        "append",
                        format!("dvmm_append answered an unknown outcome {other:?}"),
                    )),
                }
            }
            Err(e) if is_unique_violation(&e) => {
                let constraint = e
                    .as_database_error()
                    .and_then(|db| db.constraint())
                    .unwrap_or_default();
                if constraint == "dvmm_events_event_id_key" {
                    Err(invalid(
                        stream,
                        "an event id of the batch is already stored in another stream",
                    ))
                } else {
                    // The version is free for this tenant but the key is taken:
                    // another tenant's stream. Say nothing about it.
                    Err(StoreError::Conflict {
                        stream: stream.clone(),
                        expected: expected_version,
                        actual: None,
                    })
                }
            }
            // Class 22, data exception: e.g. a `\u0000` in a JSON string,
            // which JSONB cannot store.
            Err(e) if sqlstate(&e).is_some_and(|c| c.starts_with("22")) => Err(invalid(
                stream,
                format!("PostgreSQL cannot store this batch: {e}"),
            )),
            Err(e) if crate::error::is_retryable(&e) => {
                tracing::warn!(%stream, error = %e, "append failed; it may or may not have been applied");
                Err(StoreError::Backend {
                    operation: "append",
                    message: format!(
                        "{e}; if the request reached the server the append may have been applied: \
                         retry with the same events to find out"
                    ),
                    retryable: true,
                    source: Some(Box::new(e)),
                })
            }
            Err(e) => Err(backend("append", e)),
        }
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if has_nul(stream) {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM dvmm_load($1, $2, $3) ORDER BY version"
        )))
        .bind(tenant.as_uuid())
        .bind(&stream.stream_type)
        .bind(&stream.id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| backend("load", e))?;
        rows.iter().map(|row| stored_event(row, "load")).collect()
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM dvmm_read_all($1, $2, $3) ORDER BY position"
        )))
        .bind(tenant.as_uuid())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| backend("read all events", e))?;
        rows.iter()
            .map(|row| stored_event(row, "read all events"))
            .collect()
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some(UNIQUE_VIOLATION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use dvmm_core::ids::{CorrelationId, EventId, UserId};

    fn event(tenant: TenantId) -> NewEvent {
        NewEvent {
            event_type: "Test".into(),
            schema_version: 1,
            payload: serde_json::json!({}),
            metadata: EventMetadata {
                event_id: EventId::from_uuid(Uuid::new_v4()),
                tenant_id: tenant,
                user_id: UserId::from_uuid(Uuid::new_v4()),
                correlation_id: CorrelationId::from_uuid(Uuid::new_v4()),
                causation_id: None,
                occurred_at: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
            },
        }
    }

    #[test]
    fn batches_that_cannot_be_stored_are_refused_up_front() {
        let tenant = TenantId::from_uuid(Uuid::new_v4());
        let stream = StreamId::new("VmRequest", Uuid::new_v4());
        assert!(check_batch(tenant, &stream, &[event(tenant), event(tenant)]).is_ok());

        let other = TenantId::from_uuid(Uuid::new_v4());
        let err = check_batch(tenant, &stream, &[event(tenant), event(other)]).unwrap_err();
        assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");

        let e = event(tenant);
        let err = check_batch(tenant, &stream, &[e.clone(), e]).unwrap_err();
        assert!(err.to_string().contains("repeats"), "{err}");

        let nul = StreamId::new("VmRequest", "a\0b");
        let err = check_batch(tenant, &nul, &[]).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidAppend { reason, .. } if reason.contains("stream id contains a NUL")),
            "{err:?}"
        );
        let mut bad_type = event(tenant);
        bad_type.event_type = "x\0".into();
        let err = check_batch(tenant, &stream, &[bad_type]).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidAppend { reason, .. } if reason.contains("NUL character in its type")),
            "{err:?}"
        );
    }

    #[test]
    fn metadata_serializes_to_an_object() {
        let e = event(TenantId::from_uuid(Uuid::new_v4()));
        let json = metadata_json(&e.metadata);
        assert!(json.is_object());
        let back: EventMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(back, e.metadata);
    }

    #[test]
    fn appends_mark_before_they_draw_and_readers_read_the_sequence_first() {
        let latest = |function: &str| {
            crate::MIGRATOR
                .iter()
                .rev()
                .find(|m| m.sql.as_str().contains(&format!("FUNCTION {function}(")))
                .map(|m| m.sql.as_str().to_owned())
                .unwrap_or_default()
        };
        let append = latest("dvmm_append");
        let (mark, insert) = (
            append
                .find("pg_advisory_xact_lock_shared(")
                .expect("a marker"),
            append.find("INSERT INTO dvmm_events").expect("an insert"),
        );
        assert!(
            mark < insert,
            "the marker must come before the positions are drawn"
        );
        let read_all = latest("dvmm_read_all");
        let (sequence, markers) = (
            read_all
                .find("pg_sequence_last_value")
                .expect("the sequence"),
            read_all.find("FROM pg_locks").expect("the markers"),
        );
        assert!(
            sequence < markers,
            "the sequence must be read before the markers"
        );
    }

    /// What `metadata->>'field'` gives for the document `metadata_json` writes.
    fn field_text(json: &serde_json::Value, field: &str) -> Option<String> {
        match json.get(field)? {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    #[test]
    fn metadata_read_back_from_columns_equals_what_was_written() {
        let tenant = TenantId::from_uuid(Uuid::new_v4());
        let mut with_cause = event(tenant).metadata;
        with_cause.causation_id = Some(EventId::from_uuid(Uuid::new_v4()));
        with_cause.occurred_at = Utc
            .timestamp_opt(1_790_000_000, 123_456_789)
            .single()
            .unwrap();
        for metadata in [event(tenant).metadata, with_cause] {
            let json = metadata_json(&metadata);
            let texts: Vec<Option<String>> =
                ["user_id", "correlation_id", "causation_id", "occurred_at"]
                    .iter()
                    .map(|f| field_text(&json, f))
                    .collect();
            let text = MetadataText {
                user_id: texts[0].as_deref(),
                correlation_id: texts[1].as_deref(),
                causation_id: texts[2].as_deref(),
                occurred_at: texts[3].as_deref(),
            };
            let back = metadata_from_columns(
                metadata.event_id.as_uuid(),
                metadata.tenant_id.as_uuid(),
                &text,
            )
            .unwrap();
            assert_eq!(back, metadata);
        }
    }

    #[test]
    fn missing_or_malformed_metadata_fields_are_named() {
        let correlation = Uuid::new_v4().to_string();
        let check = |user_id: Option<&str>, occurred_at: Option<&str>, expected: &str| {
            let text = MetadataText {
                user_id,
                correlation_id: Some(&correlation),
                causation_id: None,
                occurred_at,
            };
            let err = metadata_from_columns(Uuid::nil(), Uuid::nil(), &text).unwrap_err();
            assert!(err.contains(expected), "{err}");
        };
        let at = Some("2026-01-01T00:00:00Z");
        check(None, at, "user_id is missing");
        check(
            Some("not-a-uuid"),
            at,
            "user_id \"not-a-uuid\" is malformed",
        );
        let user = Some("00000000-0000-0000-0000-000000000001");
        check(
            user,
            Some("yesterday"),
            "occurred_at \"yesterday\" is malformed",
        );
        check(user, None, "occurred_at is missing");
    }

    #[test]
    fn negative_numbers_from_the_database_are_corruption() {
        assert_eq!(to_u64(5, "version", "load").unwrap(), 5);
        let err = to_u64(-1, "version", "load").unwrap_err();
        assert!(!err.is_retryable());
    }
}
