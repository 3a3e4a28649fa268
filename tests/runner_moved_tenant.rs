//! A tenant moved to another vCenter while requests of the old one were
//! still provisioning, and the old vCenter is down: the new vCenter's
//! requests keep flowing and never wait for the old one, and the runner
//! parks nothing on their account.
//!
//! The old requests do not resume: a provisioning resumes only on the
//! vCenter it recorded, and the service refuses one the tenant's
//! configuration no longer names (`RecordedVcenterNotConfigured`) before
//! any vSphere call. So an outage of the old vCenter never reaches the
//! runner's parking at all, and the key the runner parks under (the
//! tenant's configured vCenter) is the recorded one whenever a call is
//! made.
//!
//! Memory store, one simulator serving both vCenters, tokio's paused clock.

mod common;

use common::PausedClock;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::backoff::FixedJitter;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Delays, Simulator, SimulatorConfig};
use dvmm::{
    Backoff, EventStore, ProvisioningRunner, ProvisioningService, RunnerConfig, TenantConfig,
    Tenants, TokioTimer, VmRequestId, VmRequestStatus,
};

const VC_OLD: &str = "https://vc-old.moved.invalid/sdk";
const VC_NEW: &str = "https://vc-new.moved.invalid/sdk";

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

fn tenant_at(tenant: &TenantConfig, url: &str) -> TenantConfig {
    let mut tenant = tenant.clone();
    tenant.vcenter.url = url.into();
    tenant.validate().expect("valid tenant");
    tenant
}

fn service(
    store: &Arc<MemoryEventStore>,
    sim: &Simulator,
    tenant: &TenantConfig,
    clock: &Arc<PausedClock>,
) -> Arc<Service> {
    Arc::new(ProvisioningService::with_clock_and_ids(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).expect("a valid tenant"),
        clock.clone(),
        dvmm::core::RandomIds,
    ))
}

async fn approve(
    service: &Service,
    tenant: &TenantConfig,
    n: usize,
    prefix: &str,
) -> Vec<VmRequestId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = service
            .submit(new_request(tenant, &format!("{prefix}{i:03}")))
            .await
            .unwrap();
        service.approve(tenant.tenant_id, id, user()).await.unwrap();
        ids.push(id);
    }
    ids
}

async fn statuses(
    service: &Service,
    tenant: &TenantConfig,
    ids: &[VmRequestId],
) -> Vec<VmRequestStatus> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let request = service.request(tenant.tenant_id, *id).await.unwrap();
        out.push(request.expect("request exists").status);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_moved_tenants_new_vcenter_keeps_flowing_while_the_old_one_is_down() {
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
    let store = Arc::new(MemoryEventStore::new());
    let base = tenant_config("acme", 5);
    let on_old = tenant_at(&base, VC_OLD);
    let on_new = tenant_at(&base, VC_NEW);

    // Started on the old vCenter, which went away mid-way: the requests
    // wait for it, their VM streams recording the old vCenter.
    let before = service(&store, &sim, &on_old, &clock);
    let old = approve(&before, &on_old, 4, "old").await;
    sim.set_endpoint_down(VC_OLD);
    for id in &old {
        let outcome = before
            .provision_attempt(on_old.tenant_id, *id)
            .await
            .expect("an attempt");
        assert!(
            matches!(outcome, dvmm::ProvisionOutcome::Deferred { .. }),
            "{outcome:?}"
        );
    }

    // Restarted with the tenant on the new vCenter; the old one stays down.
    let after = service(&store, &sim, &on_new, &clock);
    let runner: Runner = ProvisioningRunner::new(
        after.clone(),
        Arc::new(MemoryWorkQueue::with_clock(clock.clone())),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "w1".into(),
            concurrency: 4,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                .with_jitter(FixedJitter(0.5)),
            ..RunnerConfig::default()
        },
    )
    .expect("a valid runner configuration");
    let new = approve(&after, &on_new, 12, "new").await;
    let scenario = async {
        // Each new request takes ~17 s on its own; 12 of them, 4 at a time,
        // with old jobs coming back every backoff step.
        let settled = async {
            loop {
                let now = statuses(&after, &on_new, &new).await;
                if now.iter().all(|s| *s == VmRequestStatus::Ready) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), settled)
            .await
            .expect("the new vCenter's requests are all Ready within 2 minutes while the old one is down");
        let old_now = statuses(&after, &on_new, &old).await;
        assert!(
            old_now.iter().all(|s| *s == VmRequestStatus::Provisioning),
            "the old vCenter's requests are left as they were: {old_now:?}"
        );
        assert_eq!(
            runner.health().parked_endpoints,
            0,
            "the new vCenter was never parked for the old one's outage"
        );
    };
    let report = tokio::time::timeout(Duration::from_secs(3600), runner.run(scenario))
        .await
        .expect("the scenario ends within an hour of (paused) time")
        .expect("the runner stops cleanly");
    assert_eq!(report.ready, 12, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    for id in &new {
        let waits = store
            .read_all(on_new.tenant_id, 0, 1_000_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| {
                e.stream_id.id == id.to_string() && e.event_type == "VmRequestWaitingForVcenter"
            })
            .count();
        assert_eq!(
            waits, 0,
            "a request of the new vCenter never waited for the old one"
        );
    }
}
