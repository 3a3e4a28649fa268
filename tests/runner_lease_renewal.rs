//! A runner renews the lease of a job it is running even while its loop is
//! stuck on something else (here: a feed whose store read hangs far longer
//! than the lease), so no other worker takes the job over and vSphere is
//! called once. Memory adapters and the simulator on tokio's paused clock.

mod common;

use common::PausedClock;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::event::{NewEvent, StoredEvent, StreamId};
use dvmm::core::ports::{AppendOutcome, StoreError};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Delays, Operation, Simulator, SimulatorConfig};
use dvmm::{
    Backoff, EventStore, ProvisioningRunner, ProvisioningService, RunnerConfig, TenantId, Tenants,
    TokioTimer, VmRequestStatus,
};

/// The shared store, whose reads of the whole log (the runner's feed) hang
/// for `hang` once the first feed is through (it reads a page, then finds
/// nothing more).
struct HangingFeed {
    inner: Arc<MemoryEventStore>,
    reads: AtomicUsize,
    hang: Duration,
}

impl EventStore for HangingFeed {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.inner
            .append(tenant, stream, expected_version, events)
            .await
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.load(tenant, stream).await
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if self.reads.fetch_add(1, Ordering::SeqCst) > 1 {
            tokio::time::sleep(self.hang).await;
        }
        self.inner.read_all(tenant, after, limit).await
    }
}

const LEASE: Duration = Duration::from_secs(4);

fn config(worker: &str) -> RunnerConfig {
    RunnerConfig {
        worker_id: worker.into(),
        concurrency: 2,
        lease: LEASE,
        poll_interval: Duration::from_millis(100),
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(10)),
        shutdown_deadline: Duration::from_secs(5),
        ..RunnerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_running_jobs_lease_is_renewed_while_the_runner_waits_on_its_feed() {
    let clock = PausedClock::new();
    // A 60 s clone: fifteen leases long.
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(60),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    let tenant = tenant_config("acme", 5);
    let memory = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let queue = Arc::new(MemoryWorkQueue::with_clock(clock.clone()));
    let checkpoints = Arc::new(MemoryCheckpoints::new());
    let service = |store| {
        Arc::new(ProvisioningService::with_clock_and_ids(
            store,
            sim.clone(),
            timeline.clone(),
            Tenants::new().with(tenant.clone()).expect("a valid tenant"),
            clock.clone(),
            dvmm::core::RandomIds,
        ))
    };
    // Worker 1's feed hangs for ten minutes once the job is running.
    let stuck = service(Arc::new(HangingFeed {
        inner: memory.clone(),
        reads: AtomicUsize::new(0),
        hang: Duration::from_secs(600),
    }));
    let healthy = service(Arc::new(HangingFeed {
        inner: memory.clone(),
        reads: AtomicUsize::new(0),
        hang: Duration::ZERO,
    }));
    let id = healthy
        .submit(new_request(&tenant, "web01"))
        .await
        .expect("submitted");
    healthy
        .approve(tenant.tenant_id, id, user())
        .await
        .expect("approved");

    let first = ProvisioningRunner::new(
        stuck.clone(),
        queue.clone(),
        checkpoints.clone(),
        TokioTimer,
        config("worker-1"),
    )
    .expect("a valid runner configuration");
    let second = ProvisioningRunner::new(
        healthy.clone(),
        queue.clone(),
        checkpoints.clone(),
        TokioTimer,
        config("worker-2"),
    )
    .expect("a valid runner configuration");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let scenario = async {
        // Worker 1 claims the job first; worker 2 only starts afterwards
        // and would take the job over as soon as its lease lapsed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second_run = second.run(stop(stop_rx.clone()));
        let watch = async {
            for _ in 0..600 {
                let status = healthy
                    .request(tenant.tenant_id, id)
                    .await
                    .expect("loads")
                    .expect("exists")
                    .status;
                if status == VmRequestStatus::Ready {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let _ = stop_tx.send(true);
        };
        let (report, ()) = tokio::join!(second_run, watch);
        report.expect("worker 2 ran")
    };
    let (first_report, second_report) = tokio::time::timeout(
        Duration::from_secs(3600),
        futures_join(first.run(stop(stop_rx.clone())), scenario),
    )
    .await
    .expect("the scenario ends within an hour of paused time");
    let first_report = first_report.expect("worker 1 ran");
    let status = healthy
        .request(tenant.tenant_id, id)
        .await
        .expect("loads")
        .expect("exists")
        .status;
    assert_eq!(status, VmRequestStatus::Ready);
    assert_eq!(
        sim.call_count(Operation::CreateVm),
        1,
        "worker 2 took the job over: worker 1's lease lapsed while its feed hung"
    );
    assert_eq!(first_report.ready, 1, "worker 1: {first_report:?}");
    assert_eq!(second_report.ready, 0, "worker 2: {second_report:?}");
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}
