//! A host built only from the facade's paths: `dvmm::prelude::*`, the
//! symmetrical `dvmm::store::*` and `dvmm::vsphere::*` adapter modules, and
//! ids minted without a `uuid` dependency. It compiles only while those
//! paths exist, and runs a request from submission to a ready VM.

use std::sync::Arc;
use std::time::Duration;

use dvmm::prelude::*;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::Simulator;

#[tokio::test]
async fn a_host_needs_only_the_facade() {
    let sim = Simulator::default();
    let tenant: TenantConfig = sim
        .tenant_config(TenantId::new_v4(), "acme")
        .expect("the default inventory places VMs");
    let tenants = Tenants::new().with(tenant.clone()).expect("a valid tenant");
    let service = Arc::new(ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        tenants,
    ));

    let requester = UserId::new_v4();
    let request = service
        .submit(NewVmRequest {
            tenant_id: tenant.tenant_id,
            project_id: ProjectId::new_v4(),
            project_prefix: "web".into(),
            requested_name: "app01".into(),
            size: VmSize::S,
            requested_by: requester,
            justification: "facade test".into(),
        })
        .await
        .expect("submit");
    service
        .approve(tenant.tenant_id, request, UserId::new_v4())
        .await
        .expect("approve");

    // The runner, from the same import, on tokio's timer; it stops once the
    // request is ready.
    let runner = ProvisioningRunner::new(
        service.clone(),
        MemoryWorkQueue::new(),
        MemoryCheckpoints::new(),
        TokioTimer,
        RunnerConfig::default(),
    )
    .expect("the default runner configuration is valid");
    let ready = {
        let service = service.clone();
        async move {
            loop {
                let status = service
                    .request(tenant.tenant_id, request)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.status);
                if status == Some(VmRequestStatus::Ready) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let report: RunnerReport = tokio::time::timeout(Duration::from_secs(30), runner.run(ready))
        .await
        .expect("the runner did not provision the request within 30 s")
        .expect("runner");
    assert_eq!(report.ready, 1, "{report:?}");

    let state = service
        .request(tenant.tenant_id, request)
        .await
        .expect("load")
        .expect("the request exists");
    assert_eq!(state.status, VmRequestStatus::Ready);
    assert_eq!(sim.vms().len(), 1);
}

/// The adapters' paths are symmetrical: `store::{memory, postgres}` and
/// `vsphere::{soap, sim}`; naming the types is the test.
#[allow(dead_code)]
fn adapter_paths_are_symmetrical() {
    let _: Option<dvmm::store::memory::MemoryEventStore> = None;
    #[cfg(feature = "postgres")]
    let _: Option<dvmm::store::postgres::PgEventStore> = None;
    let _: Option<dvmm::vsphere::soap::SoapVsphere> = None;
    let _: Option<dvmm::vsphere::sim::Simulator> = None;
    let _: Option<(
        dvmm::ConfigError,
        dvmm::NameError,
        dvmm::Secret,
        dvmm::VcenterEndpoint,
    )> = None;
}
