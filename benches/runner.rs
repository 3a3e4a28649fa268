//! The background runner: 1,000 requests approved in a burst while the
//! workers run, on a zero-delay simulator, until every one is `Ready`.
//! Memory store vs PostgreSQL, 1 vs 3 workers (each at concurrency 8).
//! Criterion reports the throughput; the latency from each approval to its
//! `VmProvisioned` event (both timestamps from the stored events) is printed
//! as p50/p99 over all measured runs of a configuration.
//!
//! ```text
//! cargo bench --all-features --bench runner                    # memory only
//! DATABASE_URL=postgres://... cargo bench --all-features --bench runner
//! ```
//!
//! With `DATABASE_URL` (an owner/admin URL) the bench creates its own
//! database, migrates it, connects as an application login and drops it at
//! the end.
#![allow(missing_docs)]

use dvmm::Backoff;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use dvmm::core::runner::{CheckpointStore, WorkQueue};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Simulator, SimulatorConfig};
use dvmm::{
    EventStore, NewVmRequest, ProjectId, ProvisioningRunner, ProvisioningService, RunnerConfig,
    TenantConfig, TenantId, Tenants, TimelineSink, TokioTimer, UserId, VmSize,
};
use futures::StreamExt;
use uuid::Uuid;

const REQUESTS: usize = 1000;

fn simulator() -> Simulator {
    let mut config = SimulatorConfig::default();
    config.ip_pool.size = u32::MAX / 2;
    Simulator::new(config)
}

fn runner_config(i: usize) -> RunnerConfig {
    RunnerConfig {
        worker_id: format!("bench-w{i}"),
        concurrency: 8,
        poll_interval: Duration::from_millis(10),
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(10)),
        ..RunnerConfig::default()
    }
}

/// One timed run: W workers start, 1,000 requests are filed and approved
/// (16 at a time), and the clock stops when all are `Ready`. Returns the
/// elapsed time and the approval → `VmProvisioned` latencies.
async fn one_run<S, T, Q, K>(
    store: S,
    timeline: T,
    queue: Q,
    checkpoints: K,
    workers: usize,
) -> (Duration, Vec<Duration>)
where
    S: EventStore + Clone + 'static,
    T: TimelineSink + 'static,
    Q: WorkQueue + Clone + 'static,
    K: CheckpointStore + Clone + 'static,
{
    let sim = simulator();
    let tenant: TenantConfig = sim
        .tenant_config(TenantId::from_uuid(Uuid::new_v4()), "bench")
        .unwrap();
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        sim,
        timeline,
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    ));
    let runners: Vec<_> = (0..workers)
        .map(|i| {
            ProvisioningRunner::new(
                service.clone(),
                queue.clone(),
                checkpoints.clone(),
                TokioTimer,
                runner_config(i),
            )
            .expect("a valid runner configuration")
        })
        .collect();
    let (stop, _) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let running = futures::future::join_all(runners.iter().map(|r| {
        let mut stopped = stop.subscribe();
        r.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
    }));
    let work = async {
        futures::stream::iter(0..REQUESTS)
            .map(|i| {
                let service = &service;
                let tenant = &tenant;
                async move {
                    let id = service
                        .submit(NewVmRequest {
                            tenant_id: tenant.tenant_id,
                            project_id: ProjectId::from_uuid(Uuid::nil()),
                            project_prefix: "web".into(),
                            requested_name: format!("vm{i}"),
                            size: VmSize::S,
                            requested_by: UserId::from_uuid(Uuid::nil()),
                            justification: String::new(),
                        })
                        .await
                        .unwrap();
                    service
                        .approve(tenant.tenant_id, id, UserId::from_uuid(Uuid::nil()))
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        // Done when the tenant holds 1,000 VmRequestReady events.
        let mut after = 0;
        let mut ready = 0;
        while ready < REQUESTS {
            let page = store.read_all(tenant.tenant_id, after, 1000).await.unwrap();
            if let Some(last) = page.last() {
                after = last.position;
            }
            ready += page
                .iter()
                .filter(|e| e.event_type == "VmRequestReady")
                .count();
            if ready < REQUESTS {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let elapsed = started.elapsed();
        let _ = stop.send(true);
        elapsed
    };
    let (reports, elapsed) = tokio::join!(running, work);
    for report in reports {
        report.unwrap();
    }
    (elapsed, latencies(&store, tenant.tenant_id).await)
}

/// Approval → `VmProvisioned`, per request, from the stored events.
async fn latencies<S: EventStore>(store: &S, tenant: TenantId) -> Vec<Duration> {
    let mut approved = HashMap::new();
    let mut vm_of = HashMap::new();
    let mut provisioned = HashMap::new();
    let mut after = 0;
    loop {
        let page = store.read_all(tenant, after, 5000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in &page {
            let at = e.metadata.occurred_at;
            match e.event_type.as_str() {
                "VmRequestApproved" => {
                    approved.insert(e.stream_id.id.clone(), at);
                }
                "VmRequestProvisioningStarted" => {
                    let vm = e.payload["vm_id"].as_str().unwrap_or_default().to_owned();
                    vm_of.insert(e.stream_id.id.clone(), vm);
                }
                "VmProvisioned" => {
                    provisioned.insert(e.stream_id.id.clone(), at);
                }
                _ => {}
            }
        }
    }
    approved
        .iter()
        .filter_map(|(request, at)| {
            let done = provisioned.get(vm_of.get(request)?)?;
            (*done - *at).to_std().ok()
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(name: &str, mut all: Vec<Duration>, runs: usize) {
    if runs == 0 {
        // Filtered out on the command line.
        return;
    }
    all.sort();
    eprintln!(
        "{name}: approval -> VmProvisioned over {runs} runs ({} requests): p50 {:.1} ms, p99 {:.1} ms",
        all.len(),
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("runner");
    group
        .throughput(Throughput::Elements(REQUESTS as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    for workers in [1, 3] {
        let mut lat = Vec::new();
        let mut runs = 0;
        group.bench_function(format!("memory/{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (elapsed, l) = rt.block_on(one_run(
                        Arc::new(MemoryEventStore::new()),
                        Arc::new(MemoryTimeline::new()),
                        Arc::new(MemoryWorkQueue::new()),
                        Arc::new(MemoryCheckpoints::new()),
                        workers,
                    ));
                    total += elapsed;
                    lat.extend(l);
                    runs += 1;
                }
                total
            })
        });
        report(&format!("memory/{workers}_workers"), lat, runs);
    }

    #[cfg(feature = "postgres")]
    match rt.block_on(postgres::BenchDb::create()) {
        Some(db) => {
            for workers in [1, 3] {
                let mut lat = Vec::new();
                let mut runs = 0;
                group.bench_function(format!("postgres/{workers}_workers"), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            rt.block_on(db.truncate());
                            let store = db.store.clone();
                            let (elapsed, l) = rt.block_on(one_run(
                                store.clone(),
                                store.timeline(),
                                store.work_queue(),
                                store.checkpoints(),
                                workers,
                            ));
                            total += elapsed;
                            lat.extend(l);
                            runs += 1;
                        }
                        total
                    })
                });
                report(&format!("postgres/{workers}_workers"), lat, runs);
            }
            rt.block_on(db.drop());
        }
        None => eprintln!("postgres runs skipped: DATABASE_URL is not set"),
    }
    group.finish();
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::str::FromStr;
    use std::time::Duration;

    use dvmm::core::config::Secret;
    use dvmm::store::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use dvmm::store::postgres::sqlx::{self, PgPool};
    use dvmm::store::postgres::{PgEventStore, create_app_login, migrate};
    use uuid::Uuid;

    pub struct BenchDb {
        pub store: PgEventStore,
        admin: PgPool,
        server: PgConnectOptions,
        name: String,
        role: String,
    }

    impl BenchDb {
        pub async fn create() -> Option<Self> {
            let url = std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| !u.is_empty())?;
            let server = PgConnectOptions::from_str(&url).expect("DATABASE_URL is a URL");
            let suffix = &Uuid::new_v4().simple().to_string()[..10];
            let name = format!("dvmm_bench_{suffix}");
            let role = format!("dvmm_bench_app_{suffix}");
            let maintenance = PgPool::connect_with(server.clone()).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&maintenance)
                .await
                .unwrap();
            maintenance.close().await;
            let admin = PgPool::connect_with(server.clone().database(&name))
                .await
                .unwrap();
            migrate(&admin).await.unwrap();
            let password = Uuid::new_v4().simple().to_string();
            create_app_login(&admin, &role, &Secret::new(password.clone()))
                .await
                .unwrap();
            let store = PgEventStore::connect_with(
                PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(30)),
                server
                    .clone()
                    .database(&name)
                    .username(&role)
                    .password(&password),
            )
            .await
            .unwrap();
            Some(Self {
                store,
                admin,
                server,
                name,
                role,
            })
        }

        /// Every run starts from empty tables.
        pub async fn truncate(&self) {
            sqlx::query("TRUNCATE dvmm_events, dvmm_timeline, dvmm_jobs, dvmm_checkpoints")
                .execute(&self.admin)
                .await
                .unwrap();
        }

        pub async fn drop(self) {
            self.store.pool().close().await;
            self.admin.close().await;
            let maintenance = PgPool::connect_with(self.server.clone()).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.name
            )))
            .execute(&maintenance)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {}", self.role)))
                .execute(&maintenance)
                .await
                .unwrap();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
