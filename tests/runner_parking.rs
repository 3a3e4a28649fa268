//! The runner rides out a vCenter outage: the endpoint is parked, requests
//! wait (without using attempts) and resume when it is back, other vCenters
//! keep working, and a request that waits past its tenant's deadline fails
//! with a message that names no host.
//!
//! Everything runs on tokio's paused clock: the runner's timer, the
//! simulator's delays, the service's clock and the work queue's due times
//! all follow it, so a ten-minute outage takes milliseconds and no
//! assertion depends on real time.

mod common;

use common::PausedClock;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::backoff::FixedJitter;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{
    Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    Backoff, Clock, EventStore, ProvisioningRunner, ProvisioningService, RunnerConfig,
    RunnerReport, TenantConfig, Tenants, TimelineEntryType, TokioTimer, VmRequestId,
    VmRequestStatus,
};

const VC_A: &str = "https://vc-a.parking.invalid/sdk";
const VC_B: &str = "https://vc-b.parking.invalid/sdk";

type Service = ProvisioningService<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
>;
type Runner = ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
    Arc<MemoryWorkQueue>,
    Arc<MemoryCheckpoints>,
    TokioTimer,
>;

struct World {
    service: Arc<Service>,
    store: Arc<MemoryEventStore>,
    sim: Simulator,
    queue: Arc<MemoryWorkQueue>,
    checkpoints: Arc<MemoryCheckpoints>,
    acme: TenantConfig,
    globex: TenantConfig,
}

fn tenant_at(slug: &str, url: &str, deadline_secs: u64) -> TenantConfig {
    let mut tenant = tenant_config(slug, 5);
    tenant.vcenter.url = url.into();
    tenant.timeouts.unavailable_deadline_secs = deadline_secs;
    tenant.validate().expect("valid tenant");
    tenant
}

/// `acme` on vCenter A, `globex` on vCenter B; one simulator serves both.
fn world(acme_deadline_secs: u64) -> World {
    let clock = PausedClock::new();
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(8),
            reconfigure: Duration::from_secs(2),
            power_on: Duration::from_secs(2),
            ip_report: Duration::from_secs(5),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    let acme = tenant_at("acme", VC_A, acme_deadline_secs);
    let globex = tenant_at("globex", VC_B, 3600);
    let store = Arc::new(MemoryEventStore::new());
    let service = Arc::new(ProvisioningService::with_clock_and_ids(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(acme.clone())
            .and_then(|t| t.with(globex.clone()))
            .expect("valid tenant configurations"),
        clock.clone(),
        dvmm::core::RandomIds,
    ));
    World {
        service,
        store,
        sim,
        queue: Arc::new(MemoryWorkQueue::with_clock(clock)),
        checkpoints: Arc::new(MemoryCheckpoints::new()),
        acme,
        globex,
    }
}

fn config(worker: &str) -> RunnerConfig {
    RunnerConfig {
        worker_id: worker.into(),
        concurrency: 4,
        max_attempts: 5,
        // 1 s doubling to 60 s: five attempts would be used up in 15 s.
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
            .with_jitter(FixedJitter(0.5)),
        ..RunnerConfig::default()
    }
}

impl World {
    fn runner(&self, worker: &str) -> Runner {
        ProvisioningRunner::new(
            self.service.clone(),
            self.queue.clone(),
            self.checkpoints.clone(),
            TokioTimer,
            config(worker),
        )
        .expect("a valid runner configuration")
    }

    async fn approve(&self, tenant: &TenantConfig, n: usize, prefix: &str) -> Vec<VmRequestId> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = self
                .service
                .submit(new_request(tenant, &format!("{prefix}{i:03}")))
                .await
                .unwrap();
            self.service
                .approve(tenant.tenant_id, id, user())
                .await
                .unwrap();
            ids.push(id);
        }
        ids
    }

    async fn statuses(&self, tenant: &TenantConfig, ids: &[VmRequestId]) -> Vec<VmRequestStatus> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let request = self.service.request(tenant.tenant_id, *id).await.unwrap();
            out.push(request.expect("request exists").status);
        }
        out
    }

    /// Waits (on the paused clock) until every request has left
    /// Approved/Provisioning, for at most `within`.
    async fn settle(&self, tenant: &TenantConfig, ids: &[VmRequestId], within: Duration) {
        let wait = async {
            loop {
                let statuses = self.statuses(tenant, ids).await;
                if statuses.iter().all(|s| {
                    !matches!(s, VmRequestStatus::Approved | VmRequestStatus::Provisioning)
                }) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| panic!("{} requests of {} did not settle", ids.len(), tenant.slug));
    }

    async fn timeline_count(
        &self,
        tenant: &TenantConfig,
        id: VmRequestId,
        kind: TimelineEntryType,
    ) -> usize {
        self.service
            .timeline(tenant.tenant_id, id)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.entry_type == kind)
            .count()
    }

    async fn events_of(&self, tenant: &TenantConfig, id: VmRequestId, event_type: &str) -> usize {
        self.store
            .read_all(tenant.tenant_id, 0, 1_000_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.stream_id.id == id.to_string() && e.event_type == event_type)
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_minute_outage_costs_time_not_requests_and_other_vcenters_keep_working() {
    let w = world(3600);
    let acme = w.approve(&w.acme, 12, "a").await;
    let outage = Duration::from_secs(600);
    let runner = w.runner("w1");
    let mut globex = Vec::new();
    let scenario = async {
        // A few seconds in, clones are running against vCenter A.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !w.sim.vms().is_empty(),
            "work had started before the outage"
        );
        w.sim.set_endpoint_down(VC_A);
        let down_at = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Tenant globex on vCenter B is served while A is down.
        globex = w.approve(&w.globex, 8, "g").await;
        w.settle(&w.globex, &globex, Duration::from_secs(300)).await;
        assert!(
            down_at.elapsed() < outage,
            "globex must finish during the outage"
        );
        assert!(
            w.statuses(&w.globex, &globex)
                .await
                .iter()
                .all(|s| *s == VmRequestStatus::Ready),
            "globex provisioned while vCenter A was down"
        );
        let acme_now = w.statuses(&w.acme, &acme).await;
        assert!(
            acme_now.iter().all(|s| *s != VmRequestStatus::Failed),
            "no acme request failed during the outage: {acme_now:?}"
        );
        tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
        w.sim.set_endpoint_up(VC_A);
        w.settle(&w.acme, &acme, Duration::from_secs(600)).await;
    };
    let report: RunnerReport =
        tokio::time::timeout(Duration::from_secs(3600), runner.run(scenario))
            .await
            .expect("the scenario ends within an hour of (paused) time")
            .expect("the runner stops cleanly");

    assert!(
        w.statuses(&w.acme, &acme)
            .await
            .iter()
            .all(|s| *s == VmRequestStatus::Ready),
        "every request of the outage ends Ready"
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.ready, 20, "{report:?}");
    assert_eq!(
        report.retried, 0,
        "an outage is not a request failure: {report:?}"
    );
    assert!(report.waited > 0, "{report:?}");
    for id in &acme {
        assert_eq!(
            w.queue.attempts(*id),
            Some(0),
            "waiting for vCenter used no attempt"
        );
        assert_eq!(
            w.timeline_count(&w.acme, *id, TimelineEntryType::WaitingForVcenter)
                .await,
            1,
            "one 'Waiting for vCenter' per request per outage"
        );
        assert_eq!(
            w.events_of(&w.acme, *id, "VmRequestWaitingForVcenter")
                .await,
            1
        );
    }
    for id in &globex {
        assert_eq!(
            w.timeline_count(&w.globex, *id, TimelineEntryType::WaitingForVcenter)
                .await,
            0,
            "vCenter B's requests never waited"
        );
    }
    let vms = w.sim.vms();
    assert_eq!(
        vms.len(),
        20,
        "one VM per request, clones cut by the outage adopted"
    );
    let names: HashSet<_> = vms
        .iter()
        .map(|vm| (vm.folder_path.clone(), vm.name.clone()))
        .collect();
    assert_eq!(names.len(), 20, "no duplicate VM names");
    // One probe per backoff step (1, 2, 4, … 60 s over ten minutes), not
    // every parked job knocking on the door.
    let refused = w.sim.unreachable_calls();
    eprintln!("{report:?}; calls refused by the dead vCenter: {refused}");
    assert!(
        (5..=25).contains(&refused),
        "{refused} calls reached the dead vCenter"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_past_its_deadline_fails_saying_since_when() {
    let w = world(300);
    w.sim.set_endpoint_down(VC_A);
    let acme = w.approve(&w.acme, 3, "a").await;
    let runner = w.runner("w1");
    let started = w.service.clock().now();
    let report = tokio::time::timeout(
        Duration::from_secs(3600),
        runner.run(w.settle(&w.acme, &acme, Duration::from_secs(1200))),
    )
    .await
    .expect("the runner keeps running and the requests settle")
    .expect("the runner stops cleanly");
    assert_eq!(report.failed, 3, "{report:?}");
    for id in &acme {
        let request = w
            .service
            .request(w.acme.tenant_id, *id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request.status, VmRequestStatus::Failed);
        let failure = request.failure.expect("failure recorded");
        assert!(
            failure
                .message
                .contains("vCenter unreachable since 2026-03-02 12:00 UTC"),
            "{}",
            failure.message
        );
        for secret in ["parking.invalid", "vc-a", "https", "sdk"] {
            assert!(!failure.message.contains(secret), "{}", failure.message);
        }
        let timeline = w.service.timeline(w.acme.tenant_id, *id).await.unwrap();
        let kinds: Vec<_> = timeline.iter().map(|e| e.entry_type).collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == TimelineEntryType::WaitingForVcenter)
                .count(),
            1,
            "{kinds:?}"
        );
        let last = timeline.last().expect("entries");
        assert_eq!(last.entry_type, TimelineEntryType::ProvisioningFailed);
        assert!(
            last.details.contains("vCenter unreachable since"),
            "{}",
            last.details
        );
        // Failed after the deadline, and not much later: the wait is
        // checked at each probe interval (60 s at most).
        let waited = last.occurred_at - started;
        assert!(
            waited >= chrono::Duration::seconds(300)
                && waited <= chrono::Duration::seconds(300 + 61),
            "failed after {waited}"
        );
        assert_eq!(w.queue.attempts(*id), Some(0));
    }
    assert!(w.sim.vms().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_wait_survives_a_runner_restart() {
    let w = world(300);
    w.sim.set_endpoint_down(VC_A);
    let acme = w.approve(&w.acme, 2, "a").await;
    let started = w.service.clock().now();
    // The first runner sees the outage and stops after two minutes.
    let first = w.runner("w1");
    let report = tokio::time::timeout(
        Duration::from_secs(600),
        first.run(tokio::time::sleep(Duration::from_secs(120))),
    )
    .await
    .expect("the first runner stops after its shutdown")
    .expect("it stops cleanly");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(
        w.statuses(&w.acme, &acme).await,
        [VmRequestStatus::Provisioning; 2]
    );
    // A new runner knows nothing of the outage but the requests' streams:
    // they still fail five minutes after they started waiting, not five
    // minutes after the restart, and say "Waiting for vCenter" once.
    let second = w.runner("w2");
    tokio::time::timeout(
        Duration::from_secs(3600),
        second.run(w.settle(&w.acme, &acme, Duration::from_secs(1200))),
    )
    .await
    .expect("the second runner settles the requests")
    .expect("it stops cleanly");
    for id in &acme {
        let timeline = w.service.timeline(w.acme.tenant_id, *id).await.unwrap();
        let last = timeline.last().expect("entries");
        assert_eq!(last.entry_type, TimelineEntryType::ProvisioningFailed);
        let waited = last.occurred_at - started;
        assert!(
            waited <= chrono::Duration::seconds(300 + 61),
            "the deadline counted from the first wait, failed after {waited}"
        );
        assert_eq!(
            w.timeline_count(&w.acme, *id, TimelineEntryType::WaitingForVcenter)
                .await,
            1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_outage_is_a_new_wait() {
    let w = world(3600);
    let acme = w.approve(&w.acme, 1, "a").await;
    let runner = w.runner("w1");
    let scenario = async {
        // Down before the first attempt, back after a minute: the attempt
        // goes through and the request is Ready.
        w.sim.set_endpoint_down(VC_A);
        tokio::time::sleep(Duration::from_secs(60)).await;
        w.sim.set_endpoint_up(VC_A);
        w.settle(&w.acme, &acme, Duration::from_secs(600)).await;
    };
    tokio::time::timeout(Duration::from_secs(3600), runner.run(scenario))
        .await
        .expect("the request settles")
        .expect("the runner stops cleanly");
    assert_eq!(w.statuses(&w.acme, &acme).await, [VmRequestStatus::Ready]);
    assert_eq!(
        w.timeline_count(&w.acme, acme[0], TimelineEntryType::WaitingForVcenter)
            .await,
        1
    );
    // Two outages of one request, vCenter answering in between with a
    // failure about the request (a task timeout) that leaves it to retry:
    // the timeline says "Waiting for vCenter" twice.
    let w = world(3600);
    let acme = w.approve(&w.acme, 1, "b").await;
    let timeout = Fault::Error(dvmm::VsphereError::Timeout {
        operation: "CloneVM_Task".into(),
    });
    for (call, fault) in [(1, Fault::Transient), (2, timeout), (3, Fault::Transient)] {
        w.sim.add_fault(FaultRule::new(
            Operation::CreateVm,
            Trigger::Nth(call),
            fault,
        ));
    }
    let runner = w.runner("w1");
    let scenario = w.settle(&w.acme, &acme, Duration::from_secs(600));
    tokio::time::timeout(Duration::from_secs(3600), runner.run(scenario))
        .await
        .expect("the request settles")
        .expect("the runner stops cleanly");
    assert_eq!(w.statuses(&w.acme, &acme).await, [VmRequestStatus::Ready]);
    assert_eq!(
        w.timeline_count(&w.acme, acme[0], TimelineEntryType::WaitingForVcenter)
            .await,
        2,
        "two outages, two waits"
    );
    assert_eq!(
        w.timeline_count(&w.acme, acme[0], TimelineEntryType::VcenterReachable)
            .await,
        1
    );
    assert_eq!(
        w.queue.attempts(acme[0]),
        Some(1),
        "only the task timeout counted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_gets_through_starts_the_waiting_work_at_once() {
    let w = world(3600);
    w.sim.set_endpoint_down(VC_A);
    let acme = w.approve(&w.acme, 4, "a").await;
    let runner = w.runner("w1");
    let scenario = async {
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(w.sim.vms().is_empty());
        w.sim.set_endpoint_up(VC_A);
        let first = tokio::time::timeout(Duration::from_secs(60), async {
            while w.sim.vms().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::Instant::now()
        })
        .await
        .expect("a probe got through within a backoff step of the return");
        tokio::time::timeout(Duration::from_secs(60), async {
            while w.sim.vms().len() < 4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("every clone started");
        // A clone takes 17 s here: the others did not wait for the probe's.
        assert!(
            first.elapsed() <= Duration::from_secs(2),
            "the waiting work started {:?} after the probe's",
            first.elapsed()
        );
        w.settle(&w.acme, &acme, Duration::from_secs(300)).await;
    };
    let report = tokio::time::timeout(Duration::from_secs(3600), runner.run(scenario))
        .await
        .expect("the scenario ends")
        .expect("the runner stops cleanly");
    assert_eq!(report.ready, 4, "{report:?}");
    assert_eq!(w.sim.vms().len(), 4);
}
