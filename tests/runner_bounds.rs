//! The runner's bounds, on the memory adapters, the simulator and tokio's
//! paused clock: a job that keeps losing its lease is failed saying so,
//! store failures are retried with backoff a bounded number of times, and
//! finished jobs are purged after the retention.

mod common;

use common::PausedClock;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::backoff::FixedJitter;
use dvmm::core::runner::{Job, WorkQueue};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Operation, Simulator};
use dvmm::{
    Backoff, ProvisioningRunner, ProvisioningService, RunnerConfig, ServiceError, StoreError,
    TenantConfig, TenantId, Tenants, TimelineEntryType, TokioTimer, VmRequestId, VmRequestStatus,
};

/// A memory queue whose claims can be made to fail, recording when each
/// claim was asked for.
struct Flaky {
    inner: MemoryWorkQueue,
    fail_claims: Mutex<bool>,
    claims_at: Mutex<Vec<tokio::time::Instant>>,
}

impl WorkQueue for Flaky {
    async fn enqueue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        self.inner.enqueue(tenant, request_id).await
    }
    async fn requeue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        self.inner.requeue(tenant, request_id).await
    }
    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        self.claims_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if *self.fail_claims.lock().unwrap() {
            return Err(StoreError::Backend {
                operation: "claim provisioning jobs",
                message: "connection refused (injected)".into(),
                retryable: true,
                source: None,
            });
        }
        self.inner.claim(worker, max, lease).await
    }
    async fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(worker, request_id, lease).await
    }
    async fn complete(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        self.inner.complete(worker, request_id).await
    }
    async fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.inner.retry_later(worker, request_id, delay).await
    }
    async fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.inner.postpone(worker, request_id, delay).await
    }
    async fn release(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        self.inner.release(worker, request_id).await
    }
    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        self.inner.purge_finished(older_than).await
    }
    async fn counts(&self) -> Result<dvmm::core::ports::QueueCounts, StoreError> {
        self.inner.counts().await
    }
}

type Service = ProvisioningService<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
>;

struct World {
    service: Arc<Service>,
    sim: Simulator,
    tenant: TenantConfig,
    queue: Arc<Flaky>,
}

fn world() -> World {
    let clock = PausedClock::new();
    let tenant = tenant_config("acme", 5);
    let sim = Simulator::default();
    let service = Arc::new(ProvisioningService::with_clock_and_ids(
        Arc::new(MemoryEventStore::new()),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
        clock.clone(),
        dvmm::core::RandomIds,
    ));
    World {
        service,
        sim,
        tenant,
        queue: Arc::new(Flaky {
            inner: MemoryWorkQueue::with_clock(clock),
            fail_claims: Mutex::new(false),
            claims_at: Mutex::new(Vec::new()),
        }),
    }
}

type Runner = ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
    Arc<Flaky>,
    Arc<MemoryCheckpoints>,
    TokioTimer,
>;

const LEASE: Duration = Duration::from_secs(30);

impl World {
    fn runner(&self, config: RunnerConfig) -> Runner {
        ProvisioningRunner::new(
            self.service.clone(),
            self.queue.clone(),
            Arc::new(MemoryCheckpoints::new()),
            TokioTimer,
            RunnerConfig {
                worker_id: "bounds".into(),
                lease: LEASE,
                poll_interval: Duration::from_millis(100),
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                    .with_jitter(FixedJitter(1.0)),
                ..config
            },
        )
        .expect("a valid runner configuration")
    }

    async fn approve(&self, name: &str) -> VmRequestId {
        let id = self
            .service
            .submit(new_request(&self.tenant, name))
            .await
            .unwrap();
        self.service
            .approve(self.tenant.tenant_id, id, user())
            .await
            .unwrap();
        id
    }

    async fn status(&self, id: VmRequestId) -> VmRequestStatus {
        self.service
            .request(self.tenant.tenant_id, id)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    /// Runs `runner` until `done` holds (checked every 100 ms of paused
    /// time, for at most `limit` of it), then shuts it down.
    async fn run_until<F, Fut>(
        &self,
        runner: &Runner,
        limit: Duration,
        what: &str,
        done: F,
    ) -> Result<dvmm::RunnerReport, ServiceError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = runner.run(async {
            let _ = stop_rx.await;
        });
        let watch = async {
            tokio::time::timeout(limit, async {
                while !done().await {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{what} within {limit:?} of paused time"));
            let _ = stop_tx.send(());
        };
        let (report, ()) = tokio::join!(run, watch);
        report
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_that_keeps_losing_its_lease_is_failed_saying_so() {
    let w = world();
    let id = w.approve("app01").await;
    let config = RunnerConfig {
        max_claims: 3,
        ..RunnerConfig::default()
    };
    w.runner(config.clone()).feed().await.unwrap();
    // Three workers take the job in turn and die with it (no renewal, no
    // give-back): each lease runs out.
    for n in 1..=3 {
        let jobs = w
            .queue
            .claim(&format!("crashed-{n}"), 10, LEASE)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].claims, n);
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
    }
    let runner = w.runner(config);
    let report = w
        .run_until(
            &runner,
            Duration::from_secs(60),
            "the request fails",
            || async { w.status(id).await == VmRequestStatus::Failed },
        )
        .await
        .unwrap();
    assert_eq!((report.failed, report.abandoned), (1, 1), "{report:?}");
    assert_eq!(
        w.sim.call_count(Operation::CreateVm),
        0,
        "vSphere is not called again for a job that kills its workers"
    );
    let request = w
        .service
        .request(w.tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    let failure = request.failure.expect("the failure is recorded");
    assert_eq!(failure.error_code, dvmm::core::provisioning::ABANDONED);
    assert!(
        failure
            .message
            .contains("stopped without finishing 3 times in a row"),
        "{}",
        failure.message
    );
    let timeline = w.service.timeline(w.tenant.tenant_id, id).await.unwrap();
    assert!(
        timeline
            .iter()
            .any(|e| e.entry_type == TimelineEntryType::ProvisioningFailed
                && e.details.contains("gave up")),
        "{timeline:?}"
    );
    assert_eq!(w.queue.inner.pending(), 0, "the job is done");
}

#[tokio::test(start_paused = true)]
async fn failing_claims_back_off_and_the_runner_stops_after_the_limit() {
    let w = world();
    *w.queue.fail_claims.lock().unwrap() = true;
    let runner = w.runner(RunnerConfig {
        max_store_failures: 4,
        ..RunnerConfig::default()
    });
    let result = tokio::time::timeout(Duration::from_secs(600), runner.run(std::future::pending()))
        .await
        .expect("the runner stops by itself within 600 s of paused time");
    let err = result.expect_err("the store kept failing");
    assert!(matches!(err, ServiceError::Store(_)), "{err:?}");
    let at = w.queue.claims_at.lock().unwrap().clone();
    assert_eq!(at.len(), 4, "exactly max_store_failures claims: {at:?}");
    for (i, pair) in at.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let backoff = Duration::from_secs(1 << i);
        assert!(
            gap >= backoff && gap < backoff + Duration::from_millis(250),
            "claim {} came {gap:?} after the one before, expected the {backoff:?} backoff",
            i + 2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn claims_that_fail_then_work_reset_the_count() {
    let w = world();
    let id = w.approve("app01").await;
    *w.queue.fail_claims.lock().unwrap() = true;
    let runner = w.runner(RunnerConfig {
        max_store_failures: 3,
        ..RunnerConfig::default()
    });
    let queue = w.queue.clone();
    let report = w
        .run_until(
            &runner,
            Duration::from_secs(60),
            "the request is ready",
            || {
                let queue = queue.clone();
                let w = &w;
                async move {
                    // Two failures, then the store is back.
                    if queue.claims_at.lock().unwrap().len() >= 2 {
                        *queue.fail_claims.lock().unwrap() = false;
                    }
                    w.status(id).await == VmRequestStatus::Ready
                }
            },
        )
        .await
        .expect("two failures in a row are under the limit");
    assert_eq!(report.ready, 1);
}

#[tokio::test(start_paused = true)]
async fn finished_jobs_are_purged_after_the_retention() {
    let w = world();
    let id = w.approve("app01").await;
    let config = RunnerConfig {
        retention: Duration::from_secs(600),
        purge_interval: Duration::from_secs(60),
        ..RunnerConfig::default()
    };
    let runner = w.runner(config.clone());
    w.run_until(
        &runner,
        Duration::from_secs(60),
        "the request is ready",
        || async { w.status(id).await == VmRequestStatus::Ready },
    )
    .await
    .unwrap();
    assert_eq!(w.queue.inner.attempts(id), Some(0), "the done job is kept");

    // Not before the retention ...
    tokio::time::advance(Duration::from_secs(300)).await;
    let runner = w.runner(config.clone());
    let started = tokio::time::Instant::now();
    let report = w
        .run_until(&runner, Duration::from_secs(5), "two seconds", || async {
            started.elapsed() >= Duration::from_secs(2)
        })
        .await
        .unwrap();
    assert_eq!(report.purged, 0);
    assert_eq!(w.queue.inner.attempts(id), Some(0));

    // ... and after it, by the runner's periodic purge.
    let runner = w.runner(config);
    let queue = w.queue.clone();
    let report = w
        .run_until(
            &runner,
            Duration::from_secs(900),
            "the job is purged",
            || {
                let queue = queue.clone();
                async move { queue.inner.attempts(id).is_none() }
            },
        )
        .await
        .unwrap();
    assert_eq!(report.purged, 1, "{report:?}");
    assert_eq!(
        w.status(id).await,
        VmRequestStatus::Ready,
        "only the job goes"
    );
}

#[tokio::test]
async fn the_memory_queue_counts_claims_until_the_job_is_given_back() {
    let clock = Arc::new(dvmm::core::clock::ManualClock::new(
        "2026-03-02T12:00:00Z".parse().expect("valid time"),
    ));
    let queue = MemoryWorkQueue::with_clock(clock.clone());
    let tenant = TenantId::from_uuid(uuid::Uuid::new_v4());
    let id = VmRequestId::from_uuid(uuid::Uuid::new_v4());
    queue.enqueue(tenant, id).await.unwrap();
    let lease = chrono::Duration::seconds(31);
    for n in 1..=3 {
        assert_eq!(queue.claim("w", 1, LEASE).await.unwrap()[0].claims, n);
        clock.advance(lease);
    }
    let jobs = queue.claim("w", 1, LEASE).await.unwrap();
    assert_eq!(jobs[0].claims, 4);
    queue.postpone("w", id, Duration::ZERO).await.unwrap();
    assert_eq!(queue.claim("w", 1, LEASE).await.unwrap()[0].claims, 1);
    queue.retry_later("w", id, Duration::ZERO).await.unwrap();
    assert_eq!(queue.claim("w", 1, LEASE).await.unwrap()[0].claims, 1);
    queue.release("w", id).await.unwrap();
    assert_eq!(queue.claim("w", 1, LEASE).await.unwrap()[0].claims, 1);
    // Queued and leased jobs are never purged, however old.
    clock.advance(chrono::Duration::days(30));
    assert_eq!(
        queue.purge_finished(Duration::from_secs(60)).await.unwrap(),
        0
    );
    queue.complete("w", id).await.unwrap();
    assert_eq!(
        queue.purge_finished(Duration::from_secs(60)).await.unwrap(),
        0
    );
    clock.advance(chrono::Duration::seconds(60));
    assert_eq!(
        queue.purge_finished(Duration::from_secs(60)).await.unwrap(),
        1
    );
    assert_eq!(queue.pending(), 0);
    assert_eq!(queue.attempts(id), None);
}

/// With claims shared through the queue (as across processes), the runner
/// abandons under its own lease: the service must not see that lease as
/// another holder's and skip the job.
#[tokio::test(start_paused = true)]
async fn a_service_with_shared_claims_abandons_under_the_runners_lease() {
    let clock = PausedClock::new();
    let tenant = tenant_config("acme", 5);
    let sim = Simulator::default();
    let queue = Arc::new(MemoryWorkQueue::with_clock(clock.clone()));
    let service = Arc::new(
        ProvisioningService::with_clock_and_ids(
            Arc::new(MemoryEventStore::new()),
            sim.clone(),
            Arc::new(MemoryTimeline::new()),
            Tenants::new()
                .with(tenant.clone())
                .expect("a valid tenant configuration"),
            clock,
            dvmm::core::RandomIds,
        )
        .with_claims(queue.clone(), TokioTimer, LEASE),
    );
    let id = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    let runner = ProvisioningRunner::new(
        service.clone(),
        queue.clone(),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "bounds".into(),
            lease: LEASE,
            poll_interval: Duration::from_millis(100),
            max_claims: 2,
            ..RunnerConfig::default()
        },
    )
    .expect("a valid runner configuration");
    runner.feed().await.unwrap();
    for n in 1..=2 {
        let jobs = queue
            .claim(&format!("crashed-{n}"), 10, LEASE)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1);
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = runner.run(async {
        let _ = stop_rx.await;
    });
    let watch = async {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let request = service.request(tenant.tenant_id, id).await.unwrap();
                if request.is_some_and(|r| r.status == VmRequestStatus::Failed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the abandoned request to fail within 60 s of paused time");
        let _ = stop_tx.send(());
    };
    let (report, ()) = tokio::join!(run, watch);
    let report = report.unwrap();
    assert_eq!((report.failed, report.abandoned), (1, 1), "{report:?}");
    assert_eq!(sim.call_count(Operation::CreateVm), 0);
}
