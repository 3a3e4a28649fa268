//! A host that chooses its backend at run time holds one service type:
//! the same non-generic host code runs a request to Ready through the
//! spawned runner on memory and, with `DATABASE_URL`, on PostgreSQL set up
//! in one call. The vSphere side is the simulator.

mod common;
mod processes;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::any::{AnyVsphere, Backend, HostService};
use dvmm::wait::{await_request_for, conditions};
use dvmm::{RunnerConfig, RunnerExt, Secret, TenantConfig, Tenants, VmRequestStatus};

/// Host code: no type parameters, whatever the backend.
async fn file_and_wait(
    service: &HostService,
    tenant: &TenantConfig,
    name: &str,
) -> VmRequestStatus {
    let id = service.submit(new_request(tenant, name)).await.unwrap();
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    await_request_for(
        service,
        tenant.tenant_id,
        id,
        conditions::is_finished(),
        Duration::from_secs(120),
    )
    .await
    .expect("the runner finishes the request")
    .status
}

/// What the host does with whichever backend its configuration names.
async fn run_host(backend: Backend) {
    let tenant = tenant_config("acme", 1);
    let stores = backend.open().await.expect("open the backend");
    let service = Arc::new(stores.service(
        AnyVsphere::simulator(),
        Tenants::new().with(tenant.clone()).expect("valid tenant"),
    ));
    let runner = stores
        .runner(
            service.clone(),
            RunnerConfig {
                poll_interval: Duration::from_millis(50),
                ..RunnerConfig::default()
            },
        )
        .expect("valid runner config");
    let handle = runner.spawn();
    assert_eq!(
        file_and_wait(&service, &tenant, "app01").await,
        VmRequestStatus::Ready
    );
    // Reads go through the same one type, and the backend's read model.
    let listed = service.list_requests(tenant.tenant_id).await.unwrap();
    assert_eq!(listed.len(), 1);
    // The read model follows the request stream by one store call: a
    // reader that saw Ready on the stream may see the row a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = service
            .list_requests_page(tenant.tenant_id, &Default::default(), None, 10)
            .await
            .unwrap();
        if page
            .items
            .first()
            .is_some_and(|r| r.status == VmRequestStatus::Ready)
        {
            break page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read model never showed the request ready: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].status, VmRequestStatus::Ready);
    assert!(page.items[0].ip_address.is_some(), "{:?}", page.items[0]);
    let report = tokio::time::timeout(Duration::from_secs(60), handle.shutdown())
        .await
        .expect("the runner stops")
        .expect("a clean stop");
    assert_eq!(report.ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_type_runs_on_memory() {
    run_host(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_type_runs_on_postgres_set_up_in_one_call() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        return processes::skip(
            "DATABASE_URL is not set (eval \"$(scripts/pg-throwaway.sh start)\")",
        );
    };
    let db = processes::create_database(&url).await;
    run_host(Backend::Postgres {
        admin_url: db.url.clone(),
        // Dropped with the database by the harness.
        login: format!("dvmm_runner_{}", db.name),
        password: Secret::new("any-backend-test"),
    })
    .await;
    db.drop().await;
}
