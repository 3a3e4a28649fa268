//! The runner's view of the work queue's depth (`RunnerHealth::queue`, the
//! `dvmm_queue_jobs` gauge): read at a bounded rate however many jobs
//! flow, right after a run, and showing the work put off while a vCenter
//! is down as `waiting`.
//!
//! Memory store and queue, the simulator, tokio's paused clock.

mod common;

use common::PausedClock;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::backoff::FixedJitter;
use dvmm::core::ports::{Job, QueueCounts, StoreError, WorkQueue};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Delays, Simulator, SimulatorConfig};
use dvmm::{
    Backoff, ProvisioningRunner, ProvisioningService, RunnerConfig, TenantConfig, Tenants,
    TokioTimer, VmRequestId, VmRequestStatus,
};

const VC: &str = "https://vc.depth.invalid/sdk";

type Service = ProvisioningService<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
>;
/// A memory queue that counts how often it is asked for its depth.
struct CountingQueue {
    inner: MemoryWorkQueue,
    counts: AtomicUsize,
}

impl WorkQueue for CountingQueue {
    async fn enqueue(&self, tenant: dvmm::TenantId, id: VmRequestId) -> Result<(), StoreError> {
        self.inner.enqueue(tenant, id).await
    }
    async fn requeue(&self, tenant: dvmm::TenantId, id: VmRequestId) -> Result<(), StoreError> {
        self.inner.requeue(tenant, id).await
    }
    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        self.inner.claim(worker, max, lease).await
    }
    async fn renew(
        &self,
        worker: &str,
        id: VmRequestId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(worker, id, lease).await
    }
    async fn complete(&self, worker: &str, id: VmRequestId) -> Result<(), StoreError> {
        self.inner.complete(worker, id).await
    }
    async fn retry_later(
        &self,
        worker: &str,
        id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.inner.retry_later(worker, id, delay).await
    }
    async fn postpone(
        &self,
        worker: &str,
        id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.inner.postpone(worker, id, delay).await
    }
    async fn release(&self, worker: &str, id: VmRequestId) -> Result<(), StoreError> {
        self.inner.release(worker, id).await
    }
    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        self.inner.purge_finished(older_than).await
    }
    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        self.counts.fetch_add(1, Ordering::SeqCst);
        self.inner.counts().await
    }
}

type Runner = ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
    Arc<CountingQueue>,
    Arc<MemoryCheckpoints>,
    TokioTimer,
>;

const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

struct World {
    service: Arc<Service>,
    sim: Simulator,
    queue: Arc<CountingQueue>,
    tenant: TenantConfig,
    runner: Runner,
}

fn world() -> World {
    let clock = PausedClock::new();
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(8),
            power_on: Duration::from_secs(2),
            ip_report: Duration::from_secs(3),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    let mut tenant = tenant_config("acme", 5);
    tenant.vcenter.url = VC.into();
    let service = Arc::new(ProvisioningService::with_clock_and_ids(
        Arc::new(MemoryEventStore::new()),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).expect("a valid tenant"),
        clock.clone(),
        dvmm::core::RandomIds,
    ));
    let queue = Arc::new(CountingQueue {
        inner: MemoryWorkQueue::with_clock(clock),
        counts: AtomicUsize::new(0),
    });
    let runner = ProvisioningRunner::new(
        service.clone(),
        queue.clone(),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "w1".into(),
            concurrency: 8,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
                .with_jitter(FixedJitter(0.5)),
            queue_depth_interval: DEPTH_INTERVAL,
            ..RunnerConfig::default()
        },
    )
    .expect("a valid runner configuration");
    World {
        service,
        sim,
        queue,
        tenant,
        runner,
    }
}

impl World {
    async fn approve(&self, n: usize) -> Vec<VmRequestId> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = self
                .service
                .submit(new_request(&self.tenant, &format!("app{i:03}")))
                .await
                .unwrap();
            self.service
                .approve(self.tenant.tenant_id, id, user())
                .await
                .unwrap();
            ids.push(id);
        }
        ids
    }

    async fn all_ready(&self, ids: &[VmRequestId]) -> bool {
        for id in ids {
            let request = self
                .service
                .request(self.tenant.tenant_id, *id)
                .await
                .unwrap()
                .expect("the request exists");
            if request.status != VmRequestStatus::Ready {
                return false;
            }
        }
        true
    }
}

#[tokio::test(start_paused = true)]
async fn the_depth_is_read_at_a_bounded_rate_not_per_job() {
    let w = world();
    let ids = w.approve(40).await;
    let started = tokio::time::Instant::now();
    let scenario = async {
        let ready = async {
            while !w.all_ready(&ids).await {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), ready)
            .await
            .expect("40 requests are Ready within 10 minutes of paused time");
    };
    let report = tokio::time::timeout(Duration::from_secs(3600), w.runner.run(scenario))
        .await
        .expect("the run ends within an hour of paused time")
        .expect("the runner stops cleanly");
    assert_eq!(report.ready, 40, "{report:?}");
    let elapsed = started.elapsed();
    let reads = w.queue.counts.load(Ordering::SeqCst);
    // One read at the start, one per interval, one at the end.
    let bound = (elapsed.as_secs_f64() / DEPTH_INTERVAL.as_secs_f64()).floor() as usize + 2;
    assert!(
        reads <= bound,
        "{reads} depth reads over {elapsed:?} at one per {DEPTH_INTERVAL:?}"
    );
    assert!(
        reads < ids.len(),
        "fewer depth reads ({reads}) than jobs ({})",
        ids.len()
    );
    assert_eq!(
        w.runner.health().queue,
        Some(QueueCounts {
            done: 40,
            ..QueueCounts::default()
        }),
        "read once more when the runner stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn work_put_off_by_an_outage_shows_as_waiting() {
    let w = world();
    w.sim.set_endpoint_down(VC);
    let ids = w.approve(6).await;
    let scenario = async {
        // Parked: every job is put off until the next probe, one probe at a
        // time; 30 s in, the runner has read the depth several times.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let seen = w.runner.health().queue.expect("the depth was read");
        assert_eq!(
            seen.queued + seen.waiting + seen.leased,
            6,
            "every job is in the queue: {seen:?}"
        );
        assert_eq!((seen.done, seen.expired), (0, 0), "{seen:?}");
        assert!(
            seen.waiting >= 4,
            "the put-off jobs show as waiting (at most a probe and its held jobs are leased): {seen:?}"
        );
        w.sim.set_endpoint_up(VC);
        let ready = async {
            while !w.all_ready(&ids).await {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), ready)
            .await
            .expect("the requests are Ready within 10 minutes of vCenter's return");
        // The next read sees them done.
        tokio::time::sleep(DEPTH_INTERVAL).await;
        assert_eq!(
            w.runner.health().queue,
            Some(QueueCounts {
                done: 6,
                ..QueueCounts::default()
            })
        );
    };
    let report = tokio::time::timeout(Duration::from_secs(3600), w.runner.run(scenario))
        .await
        .expect("the run ends within an hour of paused time")
        .expect("the runner stops cleanly");
    assert_eq!(report.ready, 6, "{report:?}");
}
