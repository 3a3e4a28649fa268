//! The host's side of the runner: `spawn` returns a handle with health and
//! a clean shutdown, and `dvmm::wait` waits for a request to reach a state.
//! On the memory adapters and the simulator, on tokio's paused clock (the
//! waits are virtual time; a hang fails at the deadline, naming what it
//! waited for).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::Simulator;
use dvmm::wait::{WaitError, await_request, await_request_for, conditions};
use dvmm::{
    Backoff, ProvisioningRunner, ProvisioningService, RunnerConfig, RunnerExt, ServiceError,
    TenantConfig, Tenants, TokioTimer, VmRequestId, VmRequestStatus,
};

type Service = ProvisioningService<Arc<MemoryEventStore>, Simulator, Arc<MemoryTimeline>>;

const DEADLINE: Duration = Duration::from_secs(300);

fn service() -> (Arc<Service>, TenantConfig) {
    let tenant = tenant_config("acme", 5);
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        Simulator::default(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).expect("valid tenant"),
    );
    (Arc::new(service), tenant)
}

fn runner(
    service: &Arc<Service>,
) -> ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    dvmm::SystemClock,
    dvmm::RandomIds,
    MemoryWorkQueue,
    MemoryCheckpoints,
    TokioTimer,
> {
    ProvisioningRunner::new(
        service.clone(),
        MemoryWorkQueue::new(),
        MemoryCheckpoints::new(),
        TokioTimer,
        RunnerConfig {
            worker_id: "handle-test".into(),
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
            ..RunnerConfig::default()
        },
    )
    .expect("valid runner config")
}

async fn approved(service: &Service, tenant: &TenantConfig, name: &str) -> VmRequestId {
    let id = service.submit(new_request(tenant, name)).await.unwrap();
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    id
}

#[tokio::test(start_paused = true)]
async fn a_spawned_runner_provisions_reports_health_and_shuts_down_with_its_report() {
    let (service, tenant) = service();
    let handle = runner(&service).spawn();
    let ids = [
        approved(&service, &tenant, "app01").await,
        approved(&service, &tenant, "app02").await,
        approved(&service, &tenant, "app03").await,
    ];
    for id in ids {
        let request = await_request_for(
            &service,
            tenant.tenant_id,
            id,
            conditions::is_ready(),
            DEADLINE,
        )
        .await
        .expect("the runner provisions it");
        assert_eq!(request.status, VmRequestStatus::Ready);
    }
    // Health follows the runner's loop: wait (virtual time) for its turn.
    let health = tokio::time::timeout(DEADLINE, async {
        loop {
            let health = handle.health();
            if health.report.ready == 3 {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the health snapshot counts the three ready requests");
    assert!(health.running);
    assert_eq!(health.in_flight, 0);
    assert_eq!(health.store_failures, 0);
    assert!(health.last_error.is_none(), "{health:?}");
    assert!(!handle.is_finished());

    let report = tokio::time::timeout(DEADLINE, handle.shutdown())
        .await
        .expect("shutdown ends")
        .expect("a clean stop");
    assert_eq!(report.ready, 3);
    assert_eq!(report.failed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_handle_stops_the_runner() {
    let (service, tenant) = service();
    let handle = runner(&service).spawn();
    let first = approved(&service, &tenant, "app01").await;
    await_request_for(
        &service,
        tenant.tenant_id,
        first,
        conditions::is_ready(),
        DEADLINE,
    )
    .await
    .expect("provisioned while the handle lives");
    drop(handle);
    // Give the stopping runner ample (virtual) time, then file another.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let second = approved(&service, &tenant, "app02").await;
    let err = await_request_for(
        &service,
        tenant.tenant_id,
        second,
        conditions::is_finished(),
        Duration::from_secs(60),
    )
    .await
    .expect_err("no runner works on it any more");
    match err {
        WaitError::TimedOut {
            last, request_id, ..
        } => {
            assert_eq!(request_id, second);
            assert_eq!(last, VmRequestStatus::Approved);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_request_that_does_not_exist_says_so_at_once() {
    let (service, tenant) = service();
    let missing = VmRequestId::from_uuid(uuid::Uuid::new_v4());
    let err = tokio::time::timeout(
        Duration::from_secs(1),
        await_request(&service, tenant.tenant_id, missing, conditions::is_ready()),
    )
    .await
    .expect("answered without waiting")
    .expect_err("no such request");
    assert!(
        matches!(err, ServiceError::RequestNotFound(id) if id == missing),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_condition_that_already_holds_resolves_without_waiting() {
    let (service, tenant) = service();
    let id = service.submit(new_request(&tenant, "app01")).await.unwrap();
    let request = tokio::time::timeout(
        Duration::from_millis(1),
        await_request(
            &service,
            tenant.tenant_id,
            id,
            conditions::has_status(VmRequestStatus::Pending),
        ),
    )
    .await
    .expect("no sleep before the first look")
    .expect("the request exists");
    assert_eq!(request.status, VmRequestStatus::Pending);
}
