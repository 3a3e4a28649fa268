//! The background runner on the memory adapters and the simulator.

mod common;

use dvmm::Backoff;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::runner::WorkQueue;
use dvmm::store::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{
    Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    EventStore, ProvisioningRunner, ProvisioningService, RunnerConfig, TenantConfig, Tenants,
    TokioTimer, VmRequestId, VmRequestStatus, VsphereError,
};

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

struct Setup {
    service: Arc<Service>,
    store: Arc<MemoryEventStore>,
    sim: Simulator,
    tenant: TenantConfig,
    queue: Arc<MemoryWorkQueue>,
    checkpoints: Arc<MemoryCheckpoints>,
}

// The service calls create_vm once per attempt; the attempt count the
// callers pass is kept only so their call sites read as before.
fn setup(sim: Simulator, _vsphere_attempts: u32) -> Setup {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()),
    ));
    Setup {
        service,
        store,
        sim,
        tenant,
        queue: Arc::new(MemoryWorkQueue::new()),
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

    /// Completes once every request has left Approved/Provisioning.
    async fn settled(&self, ids: &[VmRequestId]) {
        loop {
            let statuses = self.statuses(ids).await;
            if statuses
                .iter()
                .all(|s| !matches!(s, VmRequestStatus::Approved | VmRequestStatus::Provisioning))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    let s = setup(sim, 1);
    let ids = s.approve(1000).await;
    let runner = s.runner(fast_config("w1", 32));
    let report = tokio::time::timeout(Duration::from_secs(120), runner.run(s.settled(&ids)))
        .await
        .expect("the runner finishes within two minutes")
        .unwrap();
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
    let s = setup(sim, 1);
    let ids = s.approve(1).await;
    let runner = s.runner(RunnerConfig {
        max_attempts: 3,
        ..fast_config("w1", 4)
    });
    let report = runner.run(s.settled(&ids)).await.unwrap();
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
    let s = setup(sim, 1);
    let ids = s.approve(1).await;
    let report = s
        .runner(fast_config("w1", 4))
        .run(s.settled(&ids))
        .await
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_unfinished_work_and_another_worker_finishes_it_without_duplicates() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_millis(1500),
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    });
    let s = setup(sim, 1);
    let ids = s.approve(6).await;
    let first = s.runner(RunnerConfig {
        shutdown_deadline: Duration::from_millis(100),
        ..fast_config("w1", 4)
    });
    let report = first
        .run(tokio::time::sleep(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(
        report.released, 4,
        "the four in-flight jobs were handed back"
    );
    assert_eq!(report.ready, 0);
    assert_eq!(s.queue.pending(), 6, "nothing was lost");
    // The clones the first worker started keep running in vSphere; the
    // second worker adopts them instead of cloning again.
    let second = s.runner(fast_config("w2", 8));
    let report = second.run(s.settled(&ids)).await.unwrap();
    assert_eq!(report.ready, 6);
    assert!(
        s.statuses(&ids)
            .await
            .iter()
            .all(|s| *s == VmRequestStatus::Ready)
    );
    assert_eq!(s.sim.vms().len(), 6, "no duplicate VMs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_claims_are_taken_over_after_the_lease() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_millis(1500),
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    });
    let s = setup(sim, 1);
    let ids = s.approve(3).await;
    let lease = Duration::from_millis(300);
    let dead = s.runner(RunnerConfig {
        lease,
        ..fast_config("dead", 8)
    });
    // The worker "dies": its future is dropped without any shutdown.
    let _ =
        tokio::time::timeout(Duration::from_millis(100), dead.run(std::future::pending())).await;
    assert!(
        s.queue.claim("probe", 10, lease).await.unwrap().is_empty(),
        "the dead worker's leases still hold"
    );
    let started = std::time::Instant::now();
    let survivor = s.runner(RunnerConfig {
        lease,
        ..fast_config("survivor", 8)
    });
    survivor.run(s.settled(&ids)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "taken over only after the lease expired"
    );
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
    let s = setup(Simulator::default(), 3);
    let early = s.approve(5).await;
    let runner = s.runner(fast_config("w1", 4));
    runner.run(s.settled(&early)).await.unwrap();
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
        .runner(fast_config("w2", 4))
        .run(s.settled(&late))
        .await
        .unwrap();
    assert_eq!(report.ready, 3, "only the new approvals were run");
    assert_eq!(s.sim.vms().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisionings_longer_than_the_lease_keep_it_by_renewal() {
    // Each clone takes four leases. Whichever worker claims first takes all
    // six; the other has room all the while and must never take one over.
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_millis(1200),
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    });
    let s = setup(sim, 1);
    let ids = s.approve(6).await;
    let lease = Duration::from_millis(300);
    let a = s.runner(RunnerConfig {
        lease,
        ..fast_config("a", 6)
    });
    let b = s.runner(RunnerConfig {
        lease,
        ..fast_config("b", 6)
    });
    let (ra, rb) = tokio::join!(a.run(s.settled(&ids)), b.run(s.settled(&ids)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.ready + rb.ready, 6);
    assert_eq!(ra.released + rb.released, 0, "a lease was lost");
    assert_eq!(
        s.sim.call_count(Operation::CreateVm),
        6,
        "a job was taken over and run twice"
    );
}
