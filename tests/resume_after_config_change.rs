//! A provisioning resumes where it started: the VM stream records the whole
//! placement when provisioning starts, and a resume builds the VM spec from
//! that record, not from the tenant's configuration of the moment. The
//! configuration typically changes with the very restart that triggers the
//! resume; searching the new place would clone a second VM.

mod common;

use std::sync::Arc;

use common::{new_request, tenant_config, user};
use dvmm::core::config::TenantConfig;
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{
    Fault, FaultRule, Inventory, Operation, SimDatacenter, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    EventStore, ProvisionOutcome, ProvisioningService, ServiceError, Tenants, VmRequestStatus,
    VspherePort,
};

type Service = ProvisioningService<Arc<MemoryEventStore>, Simulator, Arc<MemoryTimeline>>;

/// The default inventory plus a second datastore, so that the changed
/// configuration names a datastore that exists.
fn simulator() -> Simulator {
    let mut inventory = Inventory::default();
    let dc: &mut SimDatacenter = inventory
        .datacenter_mut("DC0")
        .expect("the default inventory has DC0");
    *dc = dc.clone().with_datastore("LocalDS_1", 10 * 1024);
    Simulator::new(SimulatorConfig {
        inventory,
        ..SimulatorConfig::default()
    })
}

/// A service as a restarted process builds it: same store, same vCenter,
/// the tenant's configuration as it is now.
fn service(
    store: &Arc<MemoryEventStore>,
    timeline: &Arc<MemoryTimeline>,
    sim: &Simulator,
    tenant: &TenantConfig,
) -> Service {
    ProvisioningService::new(
        store.clone(),
        sim.clone(),
        timeline.clone(),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    )
}

/// Starts a provisioning whose `create_vm` clones the VM but loses the
/// answer, as a process that dies mid-call would: the request is left in
/// `Provisioning` with a VM in vCenter that nothing recorded yet.
async fn start_and_lose_the_answer(
    service: &Service,
    sim: &Simulator,
    tenant: &TenantConfig,
    name: &str,
) -> dvmm::VmRequestId {
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Times(1),
        Fault::CreatedButCallFailed,
    ));
    let request = service.submit(new_request(tenant, name)).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let outcome = service.provision(tenant.tenant_id, request).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Deferred { .. }),
        "the lost answer leaves the request to resume: {outcome:?}"
    );
    assert_eq!(sim.vms().len(), 1, "the clone went through");
    request
}

#[tokio::test]
async fn changing_the_folder_root_and_datastore_before_the_resume_still_gives_one_vm() {
    let sim = simulator();
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let before = tenant_config("acme", 5);
    let first = service(&store, &timeline, &sim, &before);
    let request = start_and_lose_the_answer(&first, &sim, &before, "app01").await;
    drop(first); // the process stops

    // Deployed with the restart: a folder root and another datastore.
    let mut after = before.clone();
    after.folder_root = Some("dvmm".into());
    after.datastore = "LocalDS_1".into();
    let restarted = service(&store, &timeline, &sim, &after);
    let outcome = restarted.provision(after.tenant_id, request).await.unwrap();
    let ProvisionOutcome::Ready { vm_id, result } = outcome else {
        panic!("the resume adopts the VM it started: {outcome:?}")
    };

    let vms = sim.vms();
    assert_eq!(vms.len(), 1, "still exactly one VM: {vms:?}");
    assert_eq!(vms[0].vmware_vm_id, result.vmware_vm_id);
    assert_eq!(vms[0].dvmm_vm_id, Some(vm_id));
    assert_eq!(vms[0].folder_path, "acme/web", "where it was started");
    assert_eq!(vms[0].datastore, "LocalDS_0");
    assert_eq!(
        sim.call_count(Operation::CreateVm),
        2,
        "one lost call, one resume"
    );
    let request = restarted
        .request(after.tenant_id, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, VmRequestStatus::Ready);
    let events = store.read_all(after.tenant_id, 0, 1000).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "VmProvisioned")
            .count(),
        1
    );

    // The new configuration applies to new provisionings.
    let next = restarted
        .submit(new_request(&after, "app02"))
        .await
        .unwrap();
    restarted
        .approve(after.tenant_id, next, user())
        .await
        .unwrap();
    let outcome = restarted.provision(after.tenant_id, next).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    let vms = sim.vms();
    assert_eq!(vms.len(), 2);
    let new_vm = vms
        .iter()
        .find(|vm| vm.name == "web-app02")
        .expect("the new request's VM");
    assert_eq!(new_vm.folder_path, "dvmm/acme/web");
    assert_eq!(new_vm.datastore, "LocalDS_1");
}

#[tokio::test]
async fn a_resume_whose_vcenter_is_no_longer_configured_waits_without_cloning_elsewhere() {
    let sim = simulator();
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let before = tenant_config("acme", 5);
    let first = service(&store, &timeline, &sim, &before);
    let request = start_and_lose_the_answer(&first, &sim, &before, "app01").await;

    // The tenant moved to another vCenter: the old one's credentials are gone.
    let mut moved = before.clone();
    moved.vcenter.url = "https://vc-new.test.invalid/sdk".into();
    let restarted = service(&store, &timeline, &sim, &moved);
    let err = restarted
        .provision(moved.tenant_id, request)
        .await
        .expect_err("no credentials for the recorded vCenter");
    assert!(
        matches!(err, ServiceError::RecordedVcenterNotConfigured { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        !message.contains("test.invalid"),
        "the error names no host: {message}"
    );
    assert_eq!(sim.vms().len(), 1, "nothing cloned on the new vCenter");
    assert_eq!(sim.call_count(Operation::CreateVm), 1);

    // Configured again, the resume finishes the VM it started.
    let back = service(&store, &timeline, &sim, &before);
    let outcome = back.provision(before.tenant_id, request).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(sim.vms().len(), 1);
}

/// A provisioning started by a release that recorded only the folder
/// (`VmProvisioningStarted` v1): it resumes in its recorded folder, with
/// the rest of the placement from the current configuration, as before.
#[tokio::test]
async fn a_provisioning_started_before_placements_were_recorded_resumes_in_its_folder() {
    use dvmm::core::vm_request::{VmRequestEvent, VmRequestProvisioningStarted};
    use dvmm::{
        CorrelationId, DomainEvent, EventId, EventMetadata, NewEvent, StreamId, UserId, VmId,
        VmSpec, VspherePort,
    };
    use serde_json::json;
    use uuid::Uuid;

    let sim = simulator();
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let before = tenant_config("acme", 5);
    let old = service(&store, &timeline, &sim, &before);
    let request_id = old.submit(new_request(&before, "app01")).await.unwrap();
    let request = old
        .approve(before.tenant_id, request_id, user())
        .await
        .unwrap();
    // What the old release wrote before it died: the start on both streams
    // (the VM's at schema version 1) and the clone in vCenter.
    let vm_id = VmId::from_uuid(Uuid::new_v4());
    let metadata = || EventMetadata {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        tenant_id: before.tenant_id,
        user_id: UserId::from_uuid(Uuid::new_v4()),
        correlation_id: CorrelationId::from_uuid(Uuid::new_v4()),
        causation_id: None,
        occurred_at: chrono::Utc::now(),
    };
    let started =
        VmRequestEvent::VmRequestProvisioningStarted(VmRequestProvisioningStarted { vm_id });
    store
        .append(
            before.tenant_id,
            &StreamId::new("VmRequest", request_id),
            2,
            vec![started.to_new_event(metadata())],
        )
        .await
        .unwrap();
    store
        .append(
            before.tenant_id,
            &StreamId::new("Vm", vm_id),
            0,
            vec![NewEvent {
                event_type: "VmProvisioningStarted".into(),
                schema_version: 1,
                payload: json!({
                    "vm_id": vm_id,
                    "request_id": request_id,
                    "tenant_id": before.tenant_id,
                    "name": "web-app01",
                    "resources": request.resources,
                    "folder_path": "acme/web",
                }),
                metadata: metadata(),
            }],
        )
        .await
        .unwrap();
    let spec = VmSpec::for_request(
        &before,
        request_id,
        vm_id,
        &request.vm_name,
        "web",
        request.resources,
    );
    let created = sim.create_vm(&spec).await.unwrap();

    let mut after = before.clone();
    after.folder_root = Some("dvmm".into());
    let restarted = service(&store, &timeline, &sim, &after);
    let outcome = restarted
        .provision(after.tenant_id, request_id)
        .await
        .unwrap();
    let ProvisionOutcome::Ready { result, .. } = outcome else {
        panic!("the old provisioning is adopted: {outcome:?}")
    };
    assert_eq!(result.vmware_vm_id, created.vmware_vm_id);
    let vms = sim.vms();
    assert_eq!(vms.len(), 1, "still exactly one VM: {vms:?}");
    assert_eq!(vms[0].folder_path, "acme/web");
    let vm = restarted
        .vm(after.tenant_id, vm_id)
        .await
        .unwrap()
        .expect("the VM stream");
    assert_eq!(vm.placement, None, "v1 recorded none");
}

/// A refresh reads the VM on the vCenter that created it. VM ids (`vm-42`)
/// are per vCenter: asking the newly configured one for the recorded id
/// could read, and record, another VM's guest facts.
#[tokio::test]
async fn a_refresh_after_the_tenant_moved_to_another_vcenter_asks_no_other_vcenter() {
    let sim = simulator();
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let before = tenant_config("acme", 5);
    let first = service(&store, &timeline, &sim, &before);
    let request = first.submit(new_request(&before, "app01")).await.unwrap();
    first
        .approve(before.tenant_id, request, user())
        .await
        .unwrap();
    let ProvisionOutcome::Ready { vm_id, .. } =
        first.provision(before.tenant_id, request).await.unwrap()
    else {
        panic!("the first provisioning is ready");
    };

    let mut moved = before.clone();
    moved.vcenter.url = "https://vc-new.test.invalid/sdk".into();
    let restarted = service(&store, &timeline, &sim, &moved);
    let reads = sim.call_count(Operation::GetVm);
    let err = restarted
        .refresh_guest_info(moved.tenant_id, vm_id)
        .await
        .expect_err("no credentials for the VM's vCenter");
    assert!(
        matches!(err, ServiceError::RecordedVcenterNotConfigured { .. }),
        "{err:?}"
    );
    assert_eq!(
        sim.call_count(Operation::GetVm),
        reads,
        "no vCenter was asked"
    );

    // On the vCenter that made it, the refresh reads it.
    let back = service(&store, &timeline, &sim, &before);
    back.refresh_guest_info(before.tenant_id, vm_id)
        .await
        .expect("refresh on the VM's own vCenter");
    assert_eq!(sim.call_count(Operation::GetVm), reads + 1);
}

/// The simulator, recording every spec handed to `create_vm`.
#[derive(Clone)]
struct RecordingPort {
    sim: Simulator,
    specs: Arc<std::sync::Mutex<Vec<dvmm::VmSpec>>>,
}

impl VspherePort for RecordingPort {
    async fn create_vm(
        &self,
        spec: &dvmm::VmSpec,
    ) -> Result<dvmm::VmProvisioningResult, dvmm::VsphereError> {
        self.specs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(spec.clone());
        self.sim.create_vm(spec).await
    }

    async fn get_vm(
        &self,
        endpoint: &dvmm::VcenterEndpoint,
        id: &dvmm::VmwareVmId,
    ) -> Result<dvmm::VmGuestInfo, dvmm::VsphereError> {
        self.sim.get_vm(endpoint, id).await
    }

    async fn power_off_vm(
        &self,
        endpoint: &dvmm::VcenterEndpoint,
        id: &dvmm::VmwareVmId,
        owner: dvmm::VmId,
        mode: dvmm::core::ports::PowerOffMode,
    ) -> Result<dvmm::core::ports::PowerOffOutcome, dvmm::VsphereError> {
        self.sim.power_off_vm(endpoint, id, owner, mode).await
    }

    async fn destroy_vm(
        &self,
        endpoint: &dvmm::VcenterEndpoint,
        id: &dvmm::VmwareVmId,
        owner: dvmm::VmId,
    ) -> Result<(), dvmm::VsphereError> {
        self.sim.destroy_vm(endpoint, id, owner).await
    }

    async fn find_vm(
        &self,
        spec: &dvmm::VmSpec,
    ) -> Result<Option<dvmm::VmGuestInfo>, dvmm::VsphereError> {
        self.sim.find_vm(spec).await
    }
}

/// The customization wait is part of how a provisioning was started: a
/// resume after the tenant's setting changed waits as long as the start
/// meant to (as the IP wait and task timeout do), not the new setting nor
/// the default.
#[tokio::test]
async fn a_resume_after_the_customization_timeout_changed_waits_the_recorded_one() {
    let sim = simulator();
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let mut before = tenant_config("acme", 5);
    before.timeouts.customization_secs = 45;
    let first = service(&store, &timeline, &sim, &before);
    let request = start_and_lose_the_answer(&first, &sim, &before, "app01").await;
    drop(first);

    // Only the customization wait changed with the restart.
    let mut after = before.clone();
    after.timeouts.customization_secs = 900;
    let port = RecordingPort {
        sim: sim.clone(),
        specs: Default::default(),
    };
    let restarted = ProvisioningService::new(
        store.clone(),
        port.clone(),
        timeline.clone(),
        Tenants::new()
            .with(after.clone())
            .expect("a valid tenant configuration"),
    );
    let outcome = restarted.provision(after.tenant_id, request).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "the resume adopts the VM it started: {outcome:?}"
    );
    let specs = port.specs.lock().unwrap().clone();
    assert_eq!(specs.len(), 1, "one resumed create_vm: {specs:?}");
    assert_eq!(
        specs[0].customization_timeout,
        std::time::Duration::from_secs(45),
        "the customization wait the provisioning started with"
    );
    assert_eq!(sim.vms().len(), 1, "still exactly one VM");
}
