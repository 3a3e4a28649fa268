//! PostgreSQL store benchmarks (needs `DATABASE_URL`; skips without it).
//!
//! - `append/store/{events}ev/{writers}w`: appends of 1 or 4 events per
//!   transaction by 1, 4 or 16 concurrent writers, each on its own stream;
//! - `append/raw/..`: the same rows written with plain `INSERT`s in one
//!   transaction per batch (no version check, no advisory lock, no
//!   row-level security): the baseline;
//! - `append/store/1ev/1w_after_10k`: one writer appending single events to
//!   a stream that already holds 10,000 (an append must not read the whole
//!   stream; compare with `append/store/1ev/1w`);
//! - `load/100_events`: loading a 100-event stream; `load/raw/100_events`:
//!   the same rows with a plain `SELECT` by the superuser, the baseline;
//! - `read_all/2000_events`: reading a tenant's 2000 events in pages of 500.
//!
//! After criterion's runs a summary measures the store/raw ratio at 16
//! writers and the p50/p99 of loading a 100-event stream.
//!
//! ```sh
//! eval "$(scripts/pg-throwaway.sh start)"
//! cargo bench -p dvmm-store-postgres --bench pg_store
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dvmm_core::event::{NewEvent, StreamId};
use dvmm_core::ids::TenantId;
use dvmm_core::ports::EventStore;
use dvmm_store_postgres::PgEventStore;
use dvmm_store_postgres::sqlx::{self, PgPool};
use serde_json::json;
use support::{TestDb, event, tenant};
use tokio::runtime::Runtime;
use uuid::Uuid;

const WRITERS: [usize; 3] = [1, 4, 16];
const EVENTS_PER_TXN: [usize; 2] = [1, 4];

/// A realistic payload: about the size of a `VmRequestCreated`.
fn payload(i: usize) -> serde_json::Value {
    json!({
        "request_id": Uuid::new_v4(),
        "project_id": Uuid::new_v4(),
        "name": format!("web-{i:05}"),
        "size": "M",
        "template": "ubuntu-24.04",
        "network": "tenant-net",
        "justification": "load test of the event store",
    })
}

fn batch(tenant: TenantId, n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| event(tenant, payload(i))).collect()
}

/// Writes `txns` batches of `n` events through the store, one stream per writer.
async fn store_writer(store: Arc<PgEventStore>, tenant: TenantId, n: usize, txns: u64) {
    let stream = StreamId::new("VmRequest", Uuid::new_v4());
    let mut version = 0;
    for _ in 0..txns {
        store
            .append(tenant, &stream, version, batch(tenant, n))
            .await
            .expect("append");
        version += n as u64;
    }
}

/// The baseline: the same rows as plain INSERTs, one transaction per batch.
async fn raw_writer(pool: PgPool, tenant: TenantId, n: usize, txns: u64) {
    let stream_id = Uuid::new_v4().to_string();
    let mut version = 0i64;
    for _ in 0..txns {
        let mut tx = pool.begin().await.expect("begin");
        for e in batch(tenant, n) {
            version += 1;
            sqlx::query(
                "INSERT INTO dvmm_events (stream_type, stream_id, version, tenant_id, event_id, \
                 event_type, schema_version, payload, metadata) \
                 VALUES ('VmRequest', $1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&stream_id)
            .bind(version)
            .bind(tenant.as_uuid())
            .bind(e.metadata.event_id.as_uuid())
            .bind(&e.event_type)
            .bind(i64::from(e.schema_version))
            .bind(&e.payload)
            .bind(serde_json::to_value(&e.metadata).expect("metadata"))
            .execute(&mut *tx)
            .await
            .expect("insert");
        }
        tx.commit().await.expect("commit");
    }
}

/// The load baseline: the same 100 rows read by the superuser with a plain
/// `SELECT` (no function, no row-level security), payload and metadata
/// decoded the way a hand-written client would.
async fn raw_load(pool: &PgPool, stream: &StreamId) {
    use dvmm_core::event::EventMetadata;
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT position, version, event_type, payload, metadata FROM dvmm_events \
         WHERE stream_type = $1 AND stream_id = $2 ORDER BY version",
    )
    .bind(&stream.stream_type)
    .bind(&stream.id)
    .fetch_all(pool)
    .await
    .expect("select");
    let mut n = 0;
    for row in &rows {
        let _: (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
        let _: serde_json::Value = row.get(3);
        let _: sqlx::types::Json<EventMetadata> = row.get(4);
        n += 1;
    }
    assert_eq!(n, 100);
}

#[derive(Clone, Copy)]
enum Writer {
    Store,
    Raw,
}

/// Runs `writers` concurrent writers of `txns` transactions each; returns the
/// elapsed time.
async fn run_writers(
    kind: Writer,
    store: &Arc<PgEventStore>,
    raw: &PgPool,
    writers: usize,
    n: usize,
    txns: u64,
) -> Duration {
    let tenant = tenant();
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| match kind {
            Writer::Store => tokio::spawn(store_writer(store.clone(), tenant, n, txns)),
            Writer::Raw => tokio::spawn(raw_writer(raw.clone(), tenant, n, txns)),
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    start.elapsed()
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

/// Vacuums, analyzes and checkpoints before each measurement (as pgbench
/// vacuums before a run), so that autovacuum and checkpoint work left by the
/// previous case's writes does not land on this one's two CPUs.
///
/// The table starts with [`BACKGROUND_EVENTS`] events of other tenants, so
/// that plans are made for a table of a running system rather than for an
/// empty one.
fn settle(rt: &Runtime, admin: &PgPool) {
    rt.block_on(async {
        for sql in ["VACUUM ANALYZE dvmm_events", "CHECKPOINT"] {
            sqlx::query(sql).execute(admin).await.expect(sql);
        }
    });
}

/// Events already stored when the bench starts: 100 tenants, each with 625
/// streams of 4 events.
const BACKGROUND_EVENTS: i64 = 250_000;

/// Fills the table with [`BACKGROUND_EVENTS`] rows in one statement.
fn populate(rt: &Runtime, admin: &PgPool) {
    rt.block_on(async {
        sqlx::query(
            "INSERT INTO dvmm_events (stream_type, stream_id, version, tenant_id, event_id, \
             event_type, schema_version, payload, metadata) \
             SELECT 'VmRequest', 'background-' || (g / 4), g % 4 + 1, \
                    ('00000000-0000-0000-0000-' || lpad((g / 2500)::text, 12, '0'))::uuid, \
                    gen_random_uuid(), 'Background', 1, \
                    jsonb_build_object('name', 'web-' || g, 'size', 'M'), '{}' \
               FROM generate_series(0, $1 - 1) AS g",
        )
        .bind(BACKGROUND_EVENTS)
        .execute(admin)
        .await
        .expect("background events");
    });
}

fn main() {
    if std::env::var("DATABASE_URL").map_or(true, |u| u.is_empty()) {
        eprintln!(
            "skipping the PostgreSQL benchmarks: DATABASE_URL is not set \
             (start a server with: eval \"$(scripts/pg-throwaway.sh start)\")"
        );
        return;
    }
    let rt = Runtime::new().expect("tokio runtime");
    let db = rt
        .block_on(TestDb::create("pg_store bench"))
        .expect("DATABASE_URL is set");
    let store = Arc::new(rt.block_on(db.store(20)));
    let raw = rt.block_on(db.admin_pool(20));
    populate(&rt, &raw);
    let mut c = criterion_config();

    {
        let mut group = c.benchmark_group("append");
        for n in EVENTS_PER_TXN {
            for writers in WRITERS {
                group.throughput(Throughput::Elements((writers * n) as u64));
                for (name, kind) in [("store", Writer::Store), ("raw", Writer::Raw)] {
                    settle(&rt, &raw);
                    group.bench_function(
                        BenchmarkId::new(name, format!("{n}ev/{writers}w")),
                        |b| {
                            b.to_async(&rt).iter_custom(|iters| {
                                let (store, raw) = (store.clone(), raw.clone());
                                async move { run_writers(kind, &store, &raw, writers, n, iters).await }
                            })
                        },
                    );
                }
            }
        }
        group.finish();
    }

    {
        let owner = tenant();
        let long = StreamId::new("VmRequest", Uuid::new_v4());
        let mut version = rt.block_on(async {
            for v in 0..100u64 {
                store
                    .append(owner, &long, v * 100, batch(owner, 100))
                    .await
                    .expect("append");
            }
            10_000u64
        });
        settle(&rt, &raw);
        c.benchmark_group("append")
            .throughput(Throughput::Elements(1))
            .bench_function(BenchmarkId::new("store", "1ev/1w_after_10k"), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (store, long) = (store.clone(), long.clone());
                    let from = version;
                    version += iters;
                    async move {
                        let start = Instant::now();
                        for i in 0..iters {
                            store
                                .append(owner, &long, from + i, batch(owner, 1))
                                .await
                                .expect("append");
                        }
                        start.elapsed()
                    }
                })
            });
    }

    let reader = tenant();
    let stream = StreamId::new("VmRequest", Uuid::new_v4());
    rt.block_on(async {
        for v in 0..25u64 {
            store
                .append(reader, &stream, v * 4, batch(reader, 4))
                .await
                .expect("append");
        }
        // Enough other events of the tenant for read_all: 2000 in total.
        for _ in 0..19 {
            let s = StreamId::new("VmRequest", Uuid::new_v4());
            for v in 0..25u64 {
                store
                    .append(reader, &s, v * 4, batch(reader, 4))
                    .await
                    .expect("append");
            }
        }
    });
    settle(&rt, &raw);
    {
        let mut group = c.benchmark_group("load");
        group.throughput(Throughput::Elements(100));
        group.bench_function("100_events", |b| {
            b.to_async(&rt).iter(|| async {
                let events = store.load(reader, &stream).await.expect("load");
                assert_eq!(events.len(), 100);
            })
        });
        group.bench_function("raw/100_events", |b| {
            b.to_async(&rt).iter(|| raw_load(&raw, &stream))
        });
    }
    settle(&rt, &raw);
    c.benchmark_group("read_all")
        .throughput(Throughput::Elements(2000))
        .bench_function("2000_events", |b| {
            b.to_async(&rt).iter(|| async {
                let mut after = 0;
                let mut total = 0;
                loop {
                    let page = store.read_all(reader, after, 500).await.expect("read_all");
                    let Some(last) = page.last() else { break };
                    after = last.position;
                    total += page.len();
                }
                assert_eq!(total, 2000);
            })
        });
    c.final_summary();

    // The figures the targets are stated in, measured directly. Loads come
    // first, on a quiet server: after the append rounds below, PostgreSQL is
    // still writing back and vacuuming for a while.
    settle(&rt, &raw);
    println!("\nsummary:");
    let mut loads: Vec<Duration> = (0..2000)
        .map(|_| {
            let start = Instant::now();
            rt.block_on(store.load(reader, &stream)).expect("load");
            start.elapsed()
        })
        .collect();
    loads.sort();
    println!(
        "  load of a 100-event stream: p50 {:?}, p99 {:?}",
        loads[loads.len() / 2],
        loads[loads.len() * 99 / 100]
    );
    settle(&rt, &raw);
    println!("  16 writers, 50 transactions each, best of 3:");
    for n in EVENTS_PER_TXN {
        let best = |kind| {
            (0..3)
                .map(|_| rt.block_on(run_writers(kind, &store, &raw, 16, n, 50)))
                .min()
                .unwrap_or_default()
        };
        let (store_time, raw_time) = (best(Writer::Store), best(Writer::Raw));
        let rate = |d: Duration| (16 * 50 * n) as f64 / d.as_secs_f64();
        println!(
            "    {n} event(s)/txn: store {:.0} events/s, raw {:.0} events/s, ratio {:.2}",
            rate(store_time),
            rate(raw_time),
            raw_time.as_secs_f64() / store_time.as_secs_f64()
        );
    }
    rt.block_on(db.drop());
}
