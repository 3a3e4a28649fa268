//! The background runner on the memory adapters and the simulator.
//!
//! Tests about leases (takeover, renewal, release at shutdown) run on tokio's
//! paused clock, with the queue's lease clock following it ([`PausedClock`]),
//! so their margins are virtual and the outcome does not depend on how busy
//! the machine is.

mod common;

use common::PausedClock;

use dvmm::Backoff;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::runner::WorkQueue;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{
    Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    EventStore, ProvisioningRunner, ProvisioningService, RunnerConfig, RunnerReport, TenantConfig,
    Tenants, TokioTimer, VmRequestId, VmRequestStatus, VsphereError,
};
use tokio::time::Instant;

type Service = ProvisioningService<Arc<MemoryEventStore>, Simulator, Arc<MemoryTimeline>>;
type Runner = ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    dvmm::core::SystemClock,
    dvmm::core::RandomIds,
    Arc<MemoryWorkQueue>,
    Arc<MemoryCheckpoints>,
    TokioTimer,
>;

/// How long a whole run may take before the test fails instead of hanging.
/// On paused time this costs nothing: the clock jumps when all tasks idle.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// Awaits `future`, failing the test with what it was waiting for if
/// `limit` passes first.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {limit:?} waiting for {what}"),
    }
}

/// A queue whose leases and due times follow tokio's (paused) clock.
fn paused_queue() -> MemoryWorkQueue {
    MemoryWorkQueue::with_clock(PausedClock::new())
}

fn fast_config(worker: &str, concurrency: usize) -> RunnerConfig {
    RunnerConfig {
        worker_id: worker.into(),
        concurrency,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(5),
        backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
        shutdown_deadline: Duration::from_secs(5),
        ..RunnerConfig::default()
    }
}

/// For tests on paused time: polls cost CPU, not time, so poll less often.
fn paused_config(worker: &str, concurrency: usize) -> RunnerConfig {
    RunnerConfig {
        poll_interval: POLL,
        ..fast_config(worker, concurrency)
    }
}

/// The poll interval of [`paused_config`].
const POLL: Duration = Duration::from_millis(100);

struct Setup {
    service: Arc<Service>,
    store: Arc<MemoryEventStore>,
    sim: Simulator,
    tenant: TenantConfig,
    queue: Arc<MemoryWorkQueue>,
    checkpoints: Arc<MemoryCheckpoints>,
}

fn setup(sim: Simulator) -> Setup {
    setup_with_queue(sim, MemoryWorkQueue::new())
}

fn setup_with_queue(sim: Simulator, queue: MemoryWorkQueue) -> Setup {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    ));
    Setup {
        service,
        store,
        sim,
        tenant,
        queue: Arc::new(queue),
        checkpoints: Arc::new(MemoryCheckpoints::new()),
    }
}

impl Setup {
    fn runner(&self, config: RunnerConfig) -> Runner {
        ProvisioningRunner::new(
            self.service.clone(),
            self.queue.clone(),
            self.checkpoints.clone(),
            TokioTimer,
            config,
        )
        .expect("a valid runner configuration")
    }

    async fn approve(&self, n: usize) -> Vec<VmRequestId> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = self
                .service
                .submit(new_request(&self.tenant, &format!("vm{i:04}")))
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

    async fn statuses(&self, ids: &[VmRequestId]) -> Vec<VmRequestStatus> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(
                self.service
                    .request(self.tenant.tenant_id, *id)
                    .await
                    .unwrap()
                    .unwrap()
                    .status,
            );
        }
        out
    }

    /// Completes once every request has left Approved/Provisioning; fails
    /// the test, naming the statuses, if that takes longer than
    /// [`RUN_DEADLINE`].
    async fn settled(&self, ids: &[VmRequestId]) {
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            let statuses = self.statuses(ids).await;
            let busy = statuses
                .iter()
                .filter(|s| matches!(s, VmRequestStatus::Approved | VmRequestStatus::Provisioning))
                .count();
            if busy == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gave up after {RUN_DEADLINE:?} waiting for {} requests to settle: \
                 {busy} still approved or provisioning ({statuses:?})",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `runner` until the requests settle, within [`RUN_DEADLINE`].
    async fn run_until_settled(&self, runner: &Runner, ids: &[VmRequestId]) -> RunnerReport {
        within(
            RUN_DEADLINE + Duration::from_secs(10),
            "the runner to stop after the requests settled",
            runner.run(self.settled(ids)),
        )
        .await
        .expect("the runner's queue never failed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_approvals_with_faults_all_end_ready_without_duplicates() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_millis(2),
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    });
    // Random extra latency on a third of the calls, and 5% transient faults,
    // some of which happen after the VM was created.
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Probability(0.3),
        Fault::Delay(Duration::from_millis(3)),
    ));
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Probability(0.03),
        Fault::Transient,
    ));
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Probability(0.02),
        Fault::CreatedButCallFailed,
    ));
    // One attempt per call, so the runner's retry path does the work.
    let s = setup(sim);
    let ids = s.approve(1000).await;
    let runner = s.runner(fast_config("w1", 32));
    let report = s.run_until_settled(&runner, &ids).await;
    assert!(
        s.statuses(&ids)
            .await
            .iter()
            .all(|s| *s == VmRequestStatus::Ready)
    );
    assert_eq!(report.ready, 1000);
    // Transient connection faults are waited out (no attempt counted).
    assert!(
        report.retried + report.waited > 0,
        "faults were injected, so some attempts were retried"
    );
    let vms = s.sim.vms();
    assert_eq!(vms.len(), 1000, "one VM per request");
    let names: HashSet<_> = vms.iter().map(|v| v.name.clone()).collect();
    assert_eq!(names.len(), 1000, "no duplicate VM names");
    let events = s
        .store
        .read_all(s.tenant.tenant_id, 0, 100_000)
        .await
        .unwrap();
    let ids_seen: HashSet<_> = events.iter().map(|e| e.metadata.event_id).collect();
    assert_eq!(ids_seen.len(), events.len(), "no duplicate events");
    for t in [
        "VmProvisioned",
        "VmRequestReady",
        "VmRequestProvisioningStarted",
        "VmProvisioningStarted",
    ] {
        assert_eq!(
            events.iter().filter(|e| e.event_type == t).count(),
            1000,
            "one {t} per request"
        );
    }
    assert_eq!(s.queue.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_up_to_the_limit_then_recorded() {
    let sim = Simulator::default();
    // A task timeout is about the request, so it counts attempts (an
    // unreachable vCenter would not: see runner_parking.rs).
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Always,
        Fault::Error(VsphereError::Timeout {
            operation: "CloneVM_Task".into(),
        }),
    ));
    let s = setup(sim);
    let ids = s.approve(1).await;
    let runner = s.runner(RunnerConfig {
        max_attempts: 3,
        ..fast_config("w1", 4)
    });
    let report = s.run_until_settled(&runner, &ids).await;
    assert_eq!(s.statuses(&ids).await, [VmRequestStatus::Failed]);
    assert_eq!(s.sim.call_count(Operation::CreateVm), 3, "three attempts");
    assert_eq!((report.retried, report.failed), (2, 1));
    let request = s
        .service
        .request(s.tenant.tenant_id, ids[0])
        .await
        .unwrap()
        .unwrap();
    assert!(request.failure.unwrap().retryable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_fail_at_once_with_the_reason() {
    let sim = Simulator::default();
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Always,
        Fault::Error(VsphereError::InsufficientResources {
            message: "no host can run it".into(),
        }),
    ));
    let s = setup(sim);
    let ids = s.approve(1).await;
    let report = s
        .run_until_settled(&s.runner(fast_config("w1", 4)), &ids)
        .await;
    assert_eq!(s.sim.call_count(Operation::CreateVm), 1);
    assert_eq!((report.retried, report.failed), (0, 1));
    let timeline = s
        .service
        .timeline(s.tenant.tenant_id, ids[0])
        .await
        .unwrap();
    assert!(
        timeline
            .last()
            .unwrap()
            .details
            .contains("no host can run it")
    );
}

/// A simulator whose clones take `clone` of tokio time.
fn slow_clones(clone: Duration) -> Simulator {
    Simulator::new(SimulatorConfig {
        delays: Delays {
            clone,
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_unfinished_work_and_another_worker_finishes_it_without_duplicates() {
    // Clones take a minute; shutdown comes after 10 s and drains for 5 s,
    // so the four in-flight jobs cannot finish and must be handed back.
    let clone = Duration::from_secs(60);
    let s = setup_with_queue(slow_clones(clone), paused_queue());
    let ids = s.approve(6).await;
    let first = s.runner(RunnerConfig {
        lease: Duration::from_secs(120),
        shutdown_deadline: Duration::from_secs(5),
        ..paused_config("w1", 4)
    });
    let started = Instant::now();
    let report = within(
        RUN_DEADLINE,
        "the first runner to shut down",
        first.run(tokio::time::sleep(Duration::from_secs(10))),
    )
    .await
    .unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(15),
        "shutdown waited exactly its deadline for the unfinished clones"
    );
    assert_eq!(
        report.released, 4,
        "the four in-flight jobs were handed back"
    );
    assert_eq!(report.ready, 0);
    assert_eq!(s.queue.pending(), 6, "nothing was lost");
    // No lease is held after shutdown: all six can be claimed at once.
    let probe = s
        .queue
        .claim("probe", 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(probe.len(), 6, "jobs still leased after shutdown");
    for job in probe {
        s.queue.release("probe", job.request_id).await.unwrap();
    }
    // The clones the first worker started keep running in vSphere; the
    // second worker adopts them instead of cloning again.
    let report = s
        .run_until_settled(&s.runner(paused_config("w2", 8)), &ids)
        .await;
    assert_eq!(report.ready, 6);
    assert!(
        s.statuses(&ids)
            .await
            .iter()
            .all(|s| *s == VmRequestStatus::Ready)
    );
    assert_eq!(s.sim.vms().len(), 6, "no duplicate VMs");
    assert_eq!(s.queue.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dead_workers_claims_are_taken_over_after_the_lease() {
    let lease = Duration::from_secs(30);
    let s = setup_with_queue(slow_clones(Duration::from_secs(5)), paused_queue());
    let ids = s.approve(3).await;
    let dead = s.runner(RunnerConfig {
        lease,
        ..paused_config("dead", 8)
    });
    // The worker "dies" after one second: its future is dropped without any
    // shutdown, so its leases are neither released nor renewed.
    let claimed_at = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(1), dead.run(std::future::pending())).await;
    assert_eq!(
        s.statuses(&ids).await,
        [VmRequestStatus::Provisioning; 3],
        "the dead worker started every job"
    );
    assert!(
        s.queue.claim("probe", 10, lease).await.unwrap().is_empty(),
        "the dead worker's leases still hold"
    );
    let survivor = s.runner(RunnerConfig {
        lease,
        ..paused_config("survivor", 8)
    });
    // Watch while the survivor runs. The clones finished long ago, so a job
    // the survivor claims becomes Ready at once: none may be Ready two polls
    // before the leases run out, all must be two polls after.
    let watch = async {
        tokio::time::sleep_until(claimed_at + lease - 2 * POLL).await;
        let before = s.statuses(&ids).await;
        tokio::time::sleep_until(claimed_at + lease + 2 * POLL).await;
        (before, s.statuses(&ids).await)
    };
    let (report, (before, after)) = tokio::join!(s.run_until_settled(&survivor, &ids), watch);
    let finished = claimed_at.elapsed();
    assert_eq!(
        before,
        [VmRequestStatus::Provisioning; 3],
        "two polls before the lease ran out the survivor had taken over"
    );
    assert_eq!(
        after,
        [VmRequestStatus::Ready; 3],
        "two polls after the lease ran out the survivor had not finished"
    );
    assert!(
        finished >= lease && finished < lease + Duration::from_secs(1),
        "the requests settled {finished:?} after the dead worker claimed them with a {lease:?} lease"
    );
    assert_eq!(report.ready, 3);
    assert!(
        s.statuses(&ids)
            .await
            .iter()
            .all(|s| *s == VmRequestStatus::Ready)
    );
    assert_eq!(
        s.sim.vms().len(),
        3,
        "the dead worker's clones were adopted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_approved_before_the_runner_started_and_across_restarts_are_all_provisioned() {
    let s = setup(Simulator::default());
    let early = s.approve(5).await;
    s.run_until_settled(&s.runner(fast_config("w1", 4)), &early)
        .await;
    // A restart: a new runner continues from the checkpoint and only picks
    // up the new approvals.
    let late = {
        let mut ids = Vec::new();
        for i in 0..3 {
            let id = s
                .service
                .submit(new_request(&s.tenant, &format!("late{i}")))
                .await
                .unwrap();
            s.service
                .approve(s.tenant.tenant_id, id, user())
                .await
                .unwrap();
            ids.push(id);
        }
        ids
    };
    let report = s
        .run_until_settled(&s.runner(fast_config("w2", 4)), &late)
        .await;
    assert_eq!(report.ready, 3, "only the new approvals were run");
    assert_eq!(s.sim.vms().len(), 8);
}

#[tokio::test(start_paused = true)]
async fn provisionings_longer_than_the_lease_keep_it_by_renewal() {
    // Each clone takes four leases. Whichever worker claims first takes all
    // six; the other has room all the while and must never take one over.
    let lease = Duration::from_secs(10);
    let s = setup_with_queue(slow_clones(4 * lease), paused_queue());
    let ids = s.approve(6).await;
    let a = s.runner(RunnerConfig {
        lease,
        ..paused_config("a", 6)
    });
    let b = s.runner(RunnerConfig {
        lease,
        ..paused_config("b", 6)
    });
    let started = Instant::now();
    let (ra, rb) = tokio::join!(s.run_until_settled(&a, &ids), s.run_until_settled(&b, &ids));
    assert!(
        started.elapsed() >= 4 * lease,
        "the clones outlived four leases ({:?})",
        started.elapsed()
    );
    assert_eq!(ra.ready + rb.ready, 6);
    assert_eq!(ra.released + rb.released, 0, "a lease was lost");
    assert_eq!(
        s.sim.call_count(Operation::CreateVm),
        6,
        "a job was taken over and run twice"
    );
    assert_eq!(s.sim.vms().len(), 6);
}
