//! The PostgreSQL store against a real server (`DATABASE_URL`): the shared
//! conformance suite, concurrency, gap-free global order, payload edge cases,
//! tenant isolation in the database, the timeline and the migrations.
//!
//! Every test creates its own database, so they run in parallel.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{TimeZone, Utc};
use dvmm_core::event::{NewEvent, StreamId};
use dvmm_core::ids::{EventId, TenantId, VmRequestId};
use dvmm_core::ports::{AppendOutcome, EventStore, StoreError, TimelineSink};
use dvmm_core::testing::{concurrent_writers_on_one_stream, store_conformance};
use dvmm_core::timeline::{TimelineEntry, TimelineEntryType};
use dvmm_store_postgres::sqlx::postgres::PgPoolOptions;
use dvmm_store_postgres::sqlx::{self, Row};
use dvmm_store_postgres::{
    Error, PgCheckpoints, PgEventStore, PgTimeline, PgWorkQueue, migrate, verify_app_role,
};
use serde_json::json;
use support::{TestDb, event, tenant, within};
use uuid::Uuid;

/// How long a group of concurrent writers or readers may take before the
/// test fails instead of hanging (they take seconds).
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

fn stream() -> StreamId {
    StreamId::new("VmRequest", Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_store_conformance_suite() {
    let Some(db) = TestDb::create("passes_the_store_conformance_suite").await else {
        return;
    };
    let store = db.store(20).await;
    store_conformance(&store).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_on_one_stream() {
    let Some(db) = TestDb::create("thirty_two_writers_on_one_stream").await else {
        return;
    };
    let store = db.store(40).await;
    concurrent_writers_on_one_stream(&store, 32).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_on_many_streams() {
    let Some(db) = TestDb::create("thirty_two_writers_on_many_streams").await else {
        return;
    };
    let store = Arc::new(db.store(40).await);
    let t = tenant();
    const APPENDS: u64 = 15;
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream();
                for i in 0..APPENDS {
                    let batch = vec![
                        event(t, json!({ "writer": w, "append": i, "part": 0 })),
                        event(t, json!({ "writer": w, "append": i, "part": 1 })),
                    ];
                    let outcome = store.append(t, &s, i * 2, batch).await.expect("append");
                    assert!(
                        matches!(outcome, AppendOutcome::Appended { new_version, .. } if new_version == i * 2 + 2),
                        "{outcome:?}"
                    );
                }
                s
            })
        })
        .collect();
    let mut streams = Vec::new();
    for w in writers {
        streams.push(
            within(DEADLINE, "a writer of 15 appends", w)
                .await
                .expect("writer"),
        );
    }
    for s in &streams {
        let loaded = store.load(t, s).await.expect("load");
        assert_eq!(loaded.len() as u64, APPENDS * 2);
        for (i, e) in loaded.iter().enumerate() {
            assert_eq!(e.version, i as u64 + 1);
            assert_eq!(e.payload["append"], json!(i as u64 / 2));
            assert_eq!(e.payload["part"], json!(i as u64 % 2));
        }
        assert!(loaded.windows(2).all(|w| w[0].position < w[1].position));
    }
    let all = store.read_all(t, 0, 10_000).await.expect("read_all");
    assert_eq!(all.len() as u64, 32 * APPENDS * 2);
    db.drop().await;
}

/// The proof of the ordering design: while 16 writers append, a reader
/// follows `read_all` page by page. If a position could commit after a
/// higher one had been read, the reader would step over it and miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_is_gap_free_under_concurrent_writers() {
    let Some(db) = TestDb::create("read_all_is_gap_free_under_concurrent_writers").await else {
        return;
    };
    // Widen the window between drawing positions and committing: on a
    // loopback server it is too short for out-of-order commits to show up
    // often. Without the ordering design this test then fails reliably.
    for sql in [
        "CREATE FUNCTION test_commit_jitter() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(random() * 0.003); RETURN NULL; END $$",
        "CREATE TRIGGER test_commit_jitter AFTER INSERT ON dvmm_events \
         FOR EACH STATEMENT EXECUTE FUNCTION test_commit_jitter()",
    ] {
        sqlx::query(sql)
            .execute(&db.admin)
            .await
            .expect("jitter trigger");
    }
    let store = Arc::new(db.store(24).await);
    let t = tenant();
    let other = tenant();
    let done = Arc::new(AtomicBool::new(false));

    // Pages large enough for the reader to keep up with the writers: a gap
    // can only be stepped over at the newest events.
    const PAGE: usize = 100;
    let reader = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            let mut tail_reads = 0;
            loop {
                // Read the flag before the page: once the writers are done
                // and a page comes back empty, nothing can follow.
                let finished = done.load(Ordering::SeqCst);
                let page = store.read_all(t, after, PAGE).await.expect("read_all");
                tail_reads += usize::from(page.len() < PAGE);
                if let Some(last) = page.last() {
                    after = last.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    eprintln!("the reader reached the newest event {tail_reads} times");
                    return seen;
                }
            }
        })
    };

    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                let s = stream();
                let noise = stream();
                let mut version = 0;
                for i in 0..40u64 {
                    let n = 1 + (w + i as usize) % 3;
                    let batch: Vec<NewEvent> = (0..n)
                        .map(|p| event(t, json!({ "w": w, "i": i, "p": p })))
                        .collect();
                    ids.extend(batch.iter().map(|e| e.metadata.event_id));
                    store.append(t, &s, version, batch).await.expect("append");
                    version += n as u64;
                    // Another tenant's traffic interleaves in the positions.
                    if i % 4 == 0 {
                        store
                            .append(other, &noise, i / 4, vec![event(other, json!({}))])
                            .await
                            .expect("append of the other tenant");
                    }
                }
                ids
            })
        })
        .collect();
    let mut written = HashSet::new();
    for w in writers {
        written.extend(
            within(DEADLINE, "a writer of 40 appends", w)
                .await
                .expect("writer"),
        );
    }
    done.store(true, Ordering::SeqCst);
    let seen = within(DEADLINE, "the reader to reach the last event", reader)
        .await
        .expect("reader");

    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "the reader sees positions in increasing order"
    );
    let seen_ids: Vec<EventId> = seen.iter().map(|e| e.metadata.event_id).collect();
    let unique: HashSet<EventId> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "no event is seen twice");
    assert!(
        seen.iter().all(|e| e.metadata.tenant_id == t),
        "only the reader's tenant"
    );
    let missed = written.difference(&unique).count();
    assert_eq!(
        missed,
        0,
        "the reader missed {missed} of {} events",
        written.len()
    );
    assert_eq!(unique.len(), written.len());
    db.drop().await;
}

#[tokio::test]
async fn large_payloads_round_trip() {
    let Some(db) = TestDb::create("large_payloads_round_trip").await else {
        return;
    };
    let store = db.store(4).await;
    let t = tenant();
    let s = stream();
    // One 1 MiB string, and a structured payload of about the same size.
    let blob = "x".repeat(1 << 20);
    let items: Vec<_> = (0..10_000)
        .map(|i| json!({ "index": i, "name": format!("item-{i:05}"), "tags": ["a", "b"], "ratio": i as f64 / 7.0 }))
        .collect();
    let batch = vec![
        event(t, json!({ "blob": blob })),
        event(t, json!({ "items": items })),
        event(t, json!({ "blob": blob, "copy": 2 })),
        event(t, json!({ "blob": blob, "copy": 3 })),
    ];
    store
        .append(t, &s, 0, batch.clone())
        .await
        .expect("append 4 MiB in one batch");
    let loaded = store.load(t, &s).await.expect("load");
    assert_eq!(loaded.len(), 4);
    for (stored, written) in loaded.iter().zip(&batch) {
        assert_eq!(stored.payload, written.payload);
        assert_eq!(stored.metadata, written.metadata);
    }
    let read = store.read_all(t, 0, 10).await.expect("read_all");
    assert_eq!(read.len(), 4);
    assert_eq!(
        read[0].payload["blob"].as_str().map(str::len),
        Some(1 << 20)
    );
    db.drop().await;
}

#[tokio::test]
async fn unicode_round_trips_and_nul_is_refused_with_a_typed_error() {
    let Some(db) =
        TestDb::create("unicode_round_trips_and_nul_is_refused_with_a_typed_error").await
    else {
        return;
    };
    let store = db.store(4).await;
    let t = tenant();
    let s = StreamId::new("Ünïcødé-流", "ид-🦀-٣");
    let text =
        "Grüße, 你好, こんにちは, مرحبا, שלום, 🦀🚀👩‍👩‍👧, e\u{301}, \u{200d}, \u{fffd}, \u{10ffff}";
    let mut e = event(
        t,
        json!({ text: text, "ключ": ["ü", "🦀"], "escapes": "\"\\\n\t\u{1}" }),
    );
    e.event_type = "VmRequestCréé✓".into();
    store
        .append(t, &s, 0, vec![e.clone()])
        .await
        .expect("append");
    let loaded = store.load(t, &s).await.expect("load");
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].stream_id, s);
    assert_eq!(loaded[0].event_type, e.event_type);
    assert_eq!(loaded[0].payload, e.payload);

    // JSONB cannot hold U+0000: the caller gets InvalidAppend, not a raw
    // database error, and nothing is written.
    let nul = event(t, json!({ "bad": "a\u{0}b" }));
    let err = store
        .append(t, &s, 1, vec![nul])
        .await
        .expect_err("NUL is refused");
    assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let err = store
        .append(
            t,
            &StreamId::new("VmRequest", "a\0b"),
            0,
            vec![event(t, json!({}))],
        )
        .await
        .expect_err("NUL in a stream id is refused");
    assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");
    assert!(
        store
            .load(t, &StreamId::new("VmRequest", "a\0b"))
            .await
            .expect("load")
            .is_empty()
    );
    assert_eq!(store.load(t, &s).await.expect("load").len(), 1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_batch_store_it_once() {
    let Some(db) = TestDb::create("racing_retries_of_one_batch_store_it_once").await else {
        return;
    };
    let store = db.store(8).await;
    let t = tenant();
    for round in 0..20u64 {
        let s = stream();
        let batch = vec![
            event(t, json!({ "round": round })),
            event(t, json!({ "round": round })),
        ];
        let (a, b) = tokio::join!(
            store.append(t, &s, 0, batch.clone()),
            store.append(t, &s, 0, batch.clone())
        );
        let outcomes = [a.expect("first"), b.expect("second")];
        let appended = outcomes
            .iter()
            .filter(|o| matches!(o, AppendOutcome::Appended { new_version: 2, .. }))
            .count();
        let already = outcomes
            .iter()
            .filter(|o| matches!(o, AppendOutcome::AlreadyApplied { stream_version: 2 }))
            .count();
        assert_eq!((appended, already), (1, 1), "{outcomes:?}");
        assert_eq!(store.load(t, &s).await.expect("load").len(), 2);
    }
    db.drop().await;
}

#[tokio::test]
async fn an_event_id_of_another_stream_is_refused() {
    let Some(db) = TestDb::create("an_event_id_of_another_stream_is_refused").await else {
        return;
    };
    let store = db.store(4).await;
    let t = tenant();
    let e = event(t, json!({}));
    store
        .append(t, &stream(), 0, vec![e.clone()])
        .await
        .expect("append");
    let err = store
        .append(t, &stream(), 0, vec![e])
        .await
        .expect_err("reused id");
    assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");
    // A partial overlap with the stream's own events is a conflict.
    let s = stream();
    let first = event(t, json!({}));
    store
        .append(t, &s, 0, vec![first.clone()])
        .await
        .expect("append");
    let err = store
        .append(t, &s, 1, vec![first, event(t, json!({}))])
        .await
        .expect_err("partial overlap");
    assert!(err.is_conflict(), "{err:?}");
    db.drop().await;
}

/// Row-level security holds even for raw SQL through the store's own pool.
#[tokio::test]
async fn the_database_keeps_tenants_apart_even_for_raw_sql() {
    let Some(db) = TestDb::create("the_database_keeps_tenants_apart_even_for_raw_sql").await else {
        return;
    };
    let store = db.store(4).await;
    let timeline = store.timeline();
    let (a, b) = (tenant(), tenant());
    let s = stream();
    store
        .append(a, &s, 0, vec![event(a, json!({ "secret": "a's" }))])
        .await
        .expect("append");
    let request = VmRequestId::from_uuid(Uuid::parse_str(&s.id).expect("uuid"));
    timeline
        .record(TimelineEntry {
            event_id: EventId::from_uuid(Uuid::new_v4()),
            tenant_id: a,
            request_id: request,
            entry_type: TimelineEntryType::Created,
            details: "a's request".into(),
            occurred_at: Utc::now(),
            fields: Default::default(),
        })
        .await
        .expect("record");
    let pool = store.pool();

    let count = |sql: &'static str, as_tenant: Option<TenantId>| async move {
        let mut tx = pool.begin().await.expect("begin");
        if let Some(t) = as_tenant {
            sqlx::query("SELECT set_config('dvmm.tenant_id', $1, true)")
                .bind(t.to_string())
                .execute(&mut *tx)
                .await
                .expect("set tenant");
        }
        let n: i64 = sqlx::query_scalar(sql)
            .bind(a.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .expect("count");
        tx.rollback().await.expect("rollback");
        n
    };
    // Tenant A sees its rows; tenant B, and a connection with no tenant, none
    // — even when asking for A's rows by A's id.
    for (sql, rows) in [
        (
            "SELECT count(*) FROM dvmm_events WHERE tenant_id = $1 OR $1 IS NOT NULL",
            1,
        ),
        (
            "SELECT count(*) FROM dvmm_timeline WHERE tenant_id = $1 OR $1 IS NOT NULL",
            1,
        ),
        // The readers' view (migration 5) runs with the caller's rights.
        (
            "SELECT count(*) FROM dvmm_event_rows WHERE tenant_id = $1 OR $1 IS NOT NULL",
            1,
        ),
    ] {
        assert_eq!(count(sql, Some(a)).await, rows, "{sql} as A");
        assert_eq!(count(sql, Some(b)).await, 0, "{sql} as B");
        assert_eq!(count(sql, None).await, 0, "{sql} without a tenant");
    }

    // Writes: inserting a row for A while scoped to B breaks the policy;
    // UPDATE, DELETE and TRUNCATE are not granted at all.
    let attempts = [
        "INSERT INTO dvmm_events (stream_type, stream_id, version, tenant_id, event_id, event_type, \
         schema_version, payload, metadata) VALUES ('VmRequest', 'forged', 1, $1, gen_random_uuid(), \
         'Forged', 1, '{}', '{}')",
        "INSERT INTO dvmm_timeline (event_id, tenant_id, request_id, entry_type, details, occurred_at) \
         VALUES (gen_random_uuid(), $1, gen_random_uuid(), 'Created', 'forged', now())",
        "UPDATE dvmm_events SET payload = '{}' WHERE tenant_id = $1",
        "DELETE FROM dvmm_events WHERE tenant_id = $1",
        "DELETE FROM dvmm_timeline WHERE tenant_id = $1",
        "UPDATE dvmm_timeline SET details = 'x' WHERE tenant_id = $1",
    ];
    for sql in attempts {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SELECT set_config('dvmm.tenant_id', $1, true)")
            .bind(b.to_string())
            .execute(&mut *tx)
            .await
            .expect("set tenant");
        let err = sqlx::query(sql)
            .bind(a.as_uuid())
            .execute(&mut *tx)
            .await
            .expect_err(sql);
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
        tx.rollback().await.expect("rollback");
    }
    for sql in [
        "TRUNCATE dvmm_events",
        "ALTER TABLE dvmm_events DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE dvmm_events NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY dvmm_events_tenant_isolation ON dvmm_events",
    ] {
        let err = sqlx::query(sql).execute(pool).await.expect_err(sql);
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    // Turning row security off does not reveal rows: the query fails.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL row_security = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    let err = sqlx::query("SELECT count(*) FROM dvmm_events")
        .fetch_one(&mut *tx)
        .await
        .expect_err("row_security = off fails the query instead of revealing rows");
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    // insufficient_privilege: "query would be affected by row-level security
    // policy", not some other failure that would pass for it.
    assert_eq!(code.as_deref(), Some("42501"), "{err}");
    assert!(err.to_string().contains("row-level security"), "{err}");
    drop(tx);

    // Through the ports, B sees nothing of A either.
    assert!(store.load(b, &s).await.expect("load").is_empty());
    assert!(
        store
            .read_all(b, 0, 100)
            .await
            .expect("read_all")
            .is_empty()
    );
    assert!(timeline.list(b, request).await.expect("list").is_empty());
    assert_eq!(store.load(a, &s).await.expect("load").len(), 1);
    assert_eq!(timeline.list(a, request).await.expect("list").len(), 1);
    db.drop().await;
}

#[tokio::test]
async fn only_a_role_held_to_the_policies_may_run_the_store() {
    let Some(db) = TestDb::create("only_a_role_held_to_the_policies_may_run_the_store").await
    else {
        return;
    };
    let app = db.app_pool(2).await;
    verify_app_role(&app)
        .await
        .expect("the app role is held to the policies");
    let err = verify_app_role(&db.admin)
        .await
        .expect_err("the admin is not");
    assert!(matches!(err, Error::UnsafeRole { .. }), "{err}");
    // The runner's ports on the same database check the same way.
    let err = PgWorkQueue::new(db.admin.clone())
        .await
        .expect_err("the queue refuses the admin");
    assert!(matches!(err, Error::UnsafeRole { .. }), "{err}");
    let err = PgCheckpoints::new(db.admin.clone())
        .await
        .expect_err("the checkpoints refuse the admin");
    assert!(matches!(err, Error::UnsafeRole { .. }), "{err}");
    PgWorkQueue::new(app.clone())
        .await
        .expect("the queue takes the app role");
    PgCheckpoints::new(app.clone())
        .await
        .expect("the checkpoints take the app role");

    // A superuser on a database without the tables hears first that it is
    // the wrong role (and how to set up), not that the database needs
    // migrating, after which it would hear it anyway.
    let url = support::database_url("unmigrated").expect("url");
    let unmigrated = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let err = verify_app_role(&unmigrated)
        .await
        .expect_err("a superuser, whether migrated or not");
    assert!(
        matches!(&err, Error::UnsafeRole { .. }) && err.to_string().contains("setup"),
        "{err}"
    );
    // A login held to the policies, on a database without the tables, is
    // told to migrate.
    let plain = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            db.app_options
                .clone()
                .database(db.server.get_database().unwrap_or("postgres")),
        )
        .await
        .expect("the app login may connect to the unmigrated database");
    let err = verify_app_role(&plain).await.expect_err("not migrated");
    assert!(matches!(err, Error::NotMigrated), "{err}");
    plain.close().await;

    // The store's Debug output does not carry the connection password.
    let password = db.app_password.clone();
    let store = db.store(1).await;
    let debug = format!("{store:?} {:?}", store.timeline());
    assert!(!debug.contains(&password), "{debug}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let Some(db) = TestDb::create("migrations_are_idempotent_and_safe_to_run_concurrently").await
    else {
        return;
    };
    // A second database migrated by four pools at once.
    let url = support::database_url("migrations").expect("url");
    let server = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let name = format!("{}_m", db.name);
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&server)
        .await
        .expect("create");
    let options: dvmm_store_postgres::sqlx::postgres::PgConnectOptions = url.parse().expect("url");
    let mut pools = Vec::new();
    for _ in 0..4 {
        pools.push(
            PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone().database(&name))
                .await
                .expect("connect"),
        );
    }
    let results = futures::future::join_all(pools.iter().map(migrate)).await;
    for r in results {
        r.expect("concurrent migrate");
    }
    migrate(&pools[0])
        .await
        .expect("migrating again is a no-op");
    migrate(&db.admin)
        .await
        .expect("and on the first database too");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pools[0])
        .await
        .expect("count");
    assert_eq!(
        applied as usize,
        dvmm_store_postgres::MIGRATOR.iter().count()
    );
    let rls: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT relname::text, relrowsecurity, relforcerowsecurity FROM pg_class \
          WHERE relname IN ('dvmm_events', 'dvmm_timeline') ORDER BY relname",
    )
    .fetch_all(&pools[0])
    .await
    .expect("pg_class");
    assert_eq!(
        rls,
        [
            ("dvmm_events".into(), true, true),
            ("dvmm_timeline".into(), true, true)
        ]
    );
    let group = dvmm_store_postgres::app_role(&pools[0])
        .await
        .expect("the second database's application role");
    assert_ne!(
        group,
        dvmm_store_postgres::app_role(&db.admin)
            .await
            .expect("the first database's application role"),
        "each database has its own application role"
    );
    for p in pools {
        p.close().await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&server)
    .await
    .expect("drop");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {group}")))
        .execute(&server)
        .await
        .expect("drop the second database's application role");
    db.drop().await;
}

fn entry(
    tenant: TenantId,
    request: VmRequestId,
    kind: TimelineEntryType,
    at: chrono::DateTime<Utc>,
    details: &str,
) -> TimelineEntry {
    TimelineEntry {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        tenant_id: tenant,
        request_id: request,
        entry_type: kind,
        details: details.into(),
        occurred_at: at,
        fields: Default::default(),
    }
}

#[tokio::test]
async fn the_timeline_lists_entries_oldest_first_once_each() {
    let Some(db) = TestDb::create("the_timeline_lists_entries_oldest_first_once_each").await else {
        return;
    };
    let store = db.store(4).await;
    let timeline: PgTimeline = store.timeline();
    let t = tenant();
    let request = VmRequestId::from_uuid(Uuid::new_v4());
    let other_request = VmRequestId::from_uuid(Uuid::new_v4());
    let base = Utc
        .timestamp_opt(1_767_225_600, 123_456_789)
        .single()
        .expect("time");
    let created = entry(
        t,
        request,
        TimelineEntryType::Created,
        base,
        "Request submitted",
    );
    let approved = entry(
        t,
        request,
        TimelineEntryType::Approved,
        base + chrono::Duration::nanoseconds(1),
        "Approved by ✓ Jürgen",
    );
    let started = entry(
        t,
        request,
        TimelineEntryType::ProvisioningStarted,
        base + chrono::Duration::seconds(1),
        "Provisioning started",
    );
    let ready_a = entry(
        t,
        request,
        TimelineEntryType::VmReady,
        base + chrono::Duration::seconds(5),
        "VM ready - IP: 10.1.2.3",
    );
    let ready_b = entry(
        t,
        request,
        TimelineEntryType::GuestInfoRefreshed,
        base + chrono::Duration::seconds(5),
        "same instant, recorded later",
    );
    // Recorded out of order, one twice; another request's entry in between.
    for e in [&started, &created, &ready_a, &approved, &started, &ready_b] {
        timeline.record(e.clone()).await.expect("record");
    }
    timeline
        .record(entry(
            t,
            other_request,
            TimelineEntryType::Created,
            base,
            "other",
        ))
        .await
        .expect("record");
    let listed = timeline.list(t, request).await.expect("list");
    assert_eq!(listed, [created, approved, started, ready_a, ready_b]);
    assert!(
        timeline
            .list(tenant(), request)
            .await
            .expect("list")
            .is_empty()
    );

    let err = timeline
        .record(entry(
            t,
            request,
            TimelineEntryType::Created,
            base,
            "nul \0 here",
        ))
        .await
        .expect_err("NUL is refused");
    assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");
    db.drop().await;
}

/// The app role's pool may be used directly too: positions and versions are
/// what the store reported.
#[tokio::test]
async fn outcomes_report_versions_and_positions() {
    let Some(db) = TestDb::create("outcomes_report_versions_and_positions").await else {
        return;
    };
    let store = PgEventStore::new(db.app_pool(2).await)
        .await
        .expect("the app role's pool passes the check");
    let t = tenant();
    let s = stream();
    let outcome = store
        .append(t, &s, 0, vec![event(t, json!({})), event(t, json!({}))])
        .await
        .expect("append");
    let AppendOutcome::Appended {
        new_version,
        last_position,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(new_version, 2);
    let loaded = store.load(t, &s).await.expect("load");
    assert_eq!(loaded.last().map(|e| e.position), Some(last_position));
    let rows = sqlx::query("SELECT position, version FROM dvmm_events ORDER BY position")
        .fetch_all(&db.admin)
        .await
        .expect("rows");
    let by_position: HashMap<i64, i64> = rows
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
        .collect();
    for e in &loaded {
        assert_eq!(
            by_position.get(&(e.position as i64)),
            Some(&(e.version as i64))
        );
    }
    // Paging with a tiny limit and an `after` beyond the end.
    assert_eq!(store.read_all(t, 0, 1).await.expect("page").len(), 1);
    assert!(
        store
            .read_all(t, last_position, 10)
            .await
            .expect("page")
            .is_empty()
    );
    assert!(
        store
            .read_all(t, u64::MAX, 10)
            .await
            .expect("page")
            .is_empty()
    );
    assert!(store.read_all(t, 0, 0).await.expect("page").is_empty());
    db.drop().await;
}

/// The ordering design, step by step: an append whose transaction is still
/// open holds back `read_all` at its position, even for events that commit
/// after it with higher positions; once it commits, both are read in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_append_holds_back_read_all_at_its_position() {
    let Some(db) = TestDb::create("an_open_append_holds_back_read_all_at_its_position").await
    else {
        return;
    };
    let store = db.store(4).await;
    let t = tenant();
    let first = event(t, json!({"n": 1}));
    let pool = db.app_pool(1).await;
    let mut open = pool.begin().await.expect("begin");
    let row = sqlx::query(
        "SELECT outcome, last_position FROM dvmm_append($1, 'VmRequest', $2, 0, \
           ARRAY[$3]::uuid[], ARRAY['TestEvent'], ARRAY[1::bigint], ARRAY[$4::jsonb], ARRAY[$5::jsonb], false)",
    )
    .bind(t.as_uuid())
    .bind(Uuid::new_v4().to_string())
    .bind(first.metadata.event_id.as_uuid())
    .bind(&first.payload)
    .bind(serde_json::to_value(&first.metadata).expect("metadata"))
    .fetch_one(&mut *open)
    .await
    .expect("append inside an open transaction");
    let held_at: i64 = row.get(1);

    // A later append commits while the first is still open.
    let second = store
        .append(t, &stream(), 0, vec![event(t, json!({"n": 2}))])
        .await
        .expect("append");
    let AppendOutcome::Appended { last_position, .. } = second else {
        panic!("{second:?}")
    };
    assert!(last_position > held_at as u64);
    assert!(
        store.read_all(t, 0, 10).await.expect("read_all").is_empty(),
        "read_all passed a position that has not committed yet"
    );

    open.commit().await.expect("commit");
    let read = store.read_all(t, 0, 10).await.expect("read_all");
    let payloads: Vec<_> = read.iter().map(|e| e.payload["n"].clone()).collect();
    assert_eq!(payloads, [json!(1), json!(2)]);
    db.drop().await;
}

/// The SQL functions filter by tenant themselves (migration 7): a pool whose
/// role escapes row-level security (a superuser, or a login with BYPASSRLS)
/// still cannot load, read, extend or claim another tenant's stream through
/// the store.
#[tokio::test]
async fn the_functions_keep_tenants_apart_without_row_level_security() {
    let Some(db) =
        TestDb::create("the_functions_keep_tenants_apart_without_row_level_security").await
    else {
        return;
    };
    let (a, b) = (tenant(), tenant());
    let s = stream();
    let a_batch = vec![event(a, json!({ "secret": "a's" }))];
    db.store(2)
        .await
        .append(a, &s, 0, a_batch.clone())
        .await
        .expect("A appends");

    let (_, bypass_options) = db.extra_login("BYPASSRLS").await;
    let bypass = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(bypass_options)
        .await
        .expect("connect as the BYPASSRLS login");
    for (who, pool) in [
        ("BYPASSRLS login", bypass),
        ("superuser", db.admin_pool(2).await),
    ] {
        // Without the functions' own filter, each of these is A's data.
        let raw: i64 = sqlx::query_scalar("SELECT count(*) FROM dvmm_events")
            .fetch_one(&pool)
            .await
            .expect("raw count");
        assert!(
            raw >= 1,
            "{who}: the role really escapes the policy (sees {raw} rows)"
        );
        let unsafe_store = PgEventStore::new_allowing_unsafe_role(pool);
        let loaded = unsafe_store.load(b, &s).await.expect("load");
        assert!(
            loaded.is_empty(),
            "{who}: load(B, A's stream) returned {} events",
            loaded.len()
        );
        let read = unsafe_store.read_all(b, 0, 100).await.expect("read_all");
        assert!(
            read.is_empty(),
            "{who}: read_all(B) returned {} events",
            read.len()
        );

        // Extending A's stream as B: the version B sees is 0, so expecting
        // A's version 1 is a conflict that reports 0 …
        let err = unsafe_store
            .append(b, &s, 1, vec![event(b, json!({}))])
            .await
            .expect_err("B cannot extend A's stream");
        assert!(
            matches!(
                &err,
                StoreError::Conflict {
                    expected: 1,
                    actual: Some(0),
                    ..
                }
            ),
            "{who}: {err:?}"
        );
        // … and starting it anew hits A's key without learning anything.
        let err = unsafe_store
            .append(b, &s, 0, vec![event(b, json!({}))])
            .await
            .expect_err("B cannot take A's version 1");
        assert!(
            matches!(
                &err,
                StoreError::Conflict {
                    expected: 0,
                    actual: None,
                    ..
                }
            ),
            "{who}: {err:?}"
        );
        // Replaying A's batch as B is not recognised as B's retry.
        let replay = unsafe_store.append(b, &s, 0, a_batch.clone()).await;
        assert!(
            matches!(
                &replay,
                Err(StoreError::Conflict { actual: None, .. } | StoreError::InvalidAppend { .. })
            ),
            "{who}: {replay:?}"
        );
    }
    let a_sees = db.store(1).await.load(a, &s).await.expect("load as A");
    assert_eq!(a_sees.len(), 1, "A's stream is unchanged");
    assert_eq!(a_sees[0].payload, json!({ "secret": "a's" }));
    db.drop().await;
}

/// The constructors that take a pool refuse one whose role escapes the tenant
/// policies, unless the caller opts in by name.
#[tokio::test]
async fn constructors_refuse_a_pool_that_escapes_the_policies() {
    let Some(db) = TestDb::create("constructors_refuse_a_pool_that_escapes_the_policies").await
    else {
        return;
    };
    let refused = |who: &'static str, expected: &'static str| {
        move |err: Error| match err {
            Error::UnsafeRole { reason, .. } => {
                assert!(reason.contains(expected), "{who}: {reason}");
            }
            other => panic!("{who}: expected UnsafeRole, got {other:?}"),
        }
    };

    // The superuser (who also owns the tables here).
    let err = PgEventStore::new(db.admin_pool(1).await)
        .await
        .expect_err("a superuser pool is refused");
    refused("superuser", "superuser")(err);
    let err = PgTimeline::new(db.admin_pool(1).await)
        .await
        .expect_err("a superuser pool is refused by the timeline too");
    refused("superuser timeline", "superuser")(err);

    // A member of the application role with BYPASSRLS.
    let (_, options) = db.extra_login("BYPASSRLS").await;
    let pool = || {
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
    };
    let err = PgEventStore::new(pool().await.expect("connect"))
        .await
        .expect_err("a BYPASSRLS pool is refused");
    refused("BYPASSRLS", "BYPASSRLS")(err);
    let err = PgTimeline::new(pool().await.expect("connect"))
        .await
        .expect_err("a BYPASSRLS pool is refused by the timeline too");
    refused("BYPASSRLS timeline", "BYPASSRLS")(err);
    let err = PgEventStore::connect_with(PgPoolOptions::new().max_connections(1), options.clone())
        .await
        .expect_err("connect_with refuses it as well");
    refused("BYPASSRLS connect_with", "BYPASSRLS")(err);

    // A plain login that owns the tables: FORCE makes the policies apply to
    // it, but an owner may turn them off.
    let (owner, options) = db.extra_login("").await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE dvmm_events OWNER TO {owner}"
    )))
    .execute(&db.admin)
    .await
    .expect("hand the events table to the login");
    let owner_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connect as the owner");
    let err = PgEventStore::new(owner_pool.clone())
        .await
        .expect_err("the tables' owner is refused");
    refused("owner", "owns the dvmm tables")(err);

    // The application login passes, and the opt-in takes any pool.
    let app = PgEventStore::new(db.app_pool(1).await)
        .await
        .expect("the application login passes");
    PgTimeline::new(app.pool().clone())
        .await
        .expect("and so does its timeline");
    let t = tenant();
    let opted_in = PgEventStore::new_allowing_unsafe_role(owner_pool);
    opted_in
        .append(t, &stream(), 0, vec![event(t, json!({}))])
        .await
        .expect("the opt-in store works");
    PgTimeline::new_allowing_unsafe_role(db.admin_pool(1).await)
        .list(t, VmRequestId::from_uuid(Uuid::new_v4()))
        .await
        .expect("the opt-in timeline works");
    db.drop().await;
}

/// The application role is per database (migration 8): a login made for one
/// database of the cluster is refused by the store's check in another, and
/// the database itself grants it nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_for_one_database_is_denied_in_another() {
    let Some(x) = TestDb::create("a_login_for_one_database_is_denied_in_another").await else {
        return;
    };
    let y = TestDb::create("a_login_for_one_database_is_denied_in_another (y)")
        .await
        .expect("a second database");
    let (t, s) = (tenant(), stream());
    y.store(1)
        .await
        .append(t, &s, 0, vec![event(t, json!({ "in": "y" }))])
        .await
        .expect("Y's own login appends in Y");

    let x_group = dvmm_store_postgres::app_role(&x.admin)
        .await
        .expect("X's role");
    let y_group = dvmm_store_postgres::app_role(&y.admin)
        .await
        .expect("Y's role");
    assert_ne!(x_group, y_group);
    assert_eq!(
        y_group,
        format!("dvmm_app_{}", y.name),
        "named after the database"
    );

    // X's login, pointed at Y.
    let x_login_in_y = x.app_options.clone().database(&y.name);
    let err = PgEventStore::connect_with(
        PgPoolOptions::new().max_connections(1),
        x_login_in_y.clone(),
    )
    .await
    .expect_err("X's login is refused in Y");
    match &err {
        Error::NotAppRole { role, app_role } => {
            assert_eq!(role, &x.app_role);
            assert_eq!(app_role, &y_group);
        }
        other => panic!("expected NotAppRole, got {other:?}"),
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(x_login_in_y)
        .await
        .expect("PUBLIC may still connect to Y");
    let err = verify_app_role(&pool)
        .await
        .expect_err("the check refuses it");
    assert!(matches!(err, Error::NotAppRole { .. }), "{err:?}");
    // Past the check, Y grants X's login nothing.
    let err = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dvmm_events")
        .fetch_one(&pool)
        .await
        .expect_err("no SELECT on Y's events");
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("42501"), "{err}");
    let err = PgEventStore::new_allowing_unsafe_role(pool)
        .load(t, &s)
        .await
        .expect_err("no EXECUTE on Y's functions");
    let code = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<sqlx::Error>())
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("42501"), "{err:?}");
    assert!(!err.is_retryable(), "{err:?}");
    x.drop().await;
    y.drop().await;
}
