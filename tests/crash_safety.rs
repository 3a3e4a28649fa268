//! Crash safety on the simulator: the provisioning flow is interrupted at
//! every await point in turn (its future is dropped, as when a process dies)
//! and rerun; the result is always one VM, one `VmProvisioned`, a `Ready`
//! request and one "VM ready" timeline entry.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use common::stepping::Stepping;
use common::{new_request, tenant_config, user};
use dvmm::core::VmId;
use dvmm::core::config::VcenterEndpoint;
use dvmm::core::ports::{PowerOffMode, PowerOffOutcome};
use dvmm::core::spec::VmGuestInfo;
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{Fault, FaultRule, Operation, Simulator, Trigger};
use dvmm::{
    EventStore, ProvisionOutcome, ProvisioningService, TenantConfig, Tenants, TimelineEntryType,
    TimelineSink, VmProvisioningResult, VmRequestId, VmRequestStatus, VmSpec, VmwareVmId,
    VsphereError, VspherePort,
};

/// How long one provisioning may take here: the simulator has no delays,
/// so this only ever fires on a hang.
const DEADLINE: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test with what it was waiting for if
/// [`DEADLINE`] passes first.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {DEADLINE:?} waiting for {what}"),
    }
}

type World = (
    ProvisioningService<
        Stepping<Arc<MemoryEventStore>>,
        Stepping<Simulator>,
        Stepping<Arc<MemoryTimeline>>,
    >,
    Arc<MemoryEventStore>,
    Arc<MemoryTimeline>,
    Simulator,
    TenantConfig,
);

fn world() -> World {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let sim = Simulator::default();
    let service = ProvisioningService::new(
        Stepping(store.clone()),
        Stepping(sim.clone()),
        Stepping(timeline.clone()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    (service, store, timeline, sim, tenant)
}

async fn assert_exactly_one_vm(world: &World, request: VmRequestId) {
    let (service, store, timeline, sim, tenant) = world;
    check_one_vm(service, store, timeline, sim, tenant, request).await;
}

async fn check_one_vm<S: EventStore, V: VspherePort, T: TimelineSink>(
    service: &ProvisioningService<S, V, T>,
    store: &MemoryEventStore,
    timeline: &MemoryTimeline,
    sim: &Simulator,
    tenant: &TenantConfig,
    request: VmRequestId,
) {
    let vms = sim.vms();
    assert_eq!(vms.len(), 1, "exactly one VM in vSphere: {vms:?}");
    assert_eq!(vms[0].name, "web-app01");
    let events = store.read_all(tenant.tenant_id, 0, 1000).await.unwrap();
    let count = |t: &str| events.iter().filter(|e| e.event_type == t).count();
    assert_eq!(count("VmProvisioned"), 1, "exactly one VmProvisioned");
    assert_eq!(count("VmRequestReady"), 1);
    assert_eq!(count("VmRequestProvisioningStarted"), 1);
    assert_eq!(count("VmProvisioningStarted"), 1);
    // Not every run reaches the customization wait (a rerun may find the
    // VM ready), but none records it twice.
    assert!(count("VmRequestCustomizingGuest") <= 1);
    let request = service
        .request(tenant.tenant_id, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, VmRequestStatus::Ready);
    assert_eq!(
        request.vm_id, vms[0].dvmm_vm_id,
        "the VM carries the request's VM id"
    );
    let entries = timeline.list(tenant.tenant_id, request.id).await.unwrap();
    let of = |t: TimelineEntryType| entries.iter().filter(|e| e.entry_type == t).count();
    assert_eq!(
        of(TimelineEntryType::VmReady),
        1,
        "exactly one VM ready entry"
    );
    assert_eq!(of(TimelineEntryType::ProvisioningStarted), 1);
    assert!(of(TimelineEntryType::CustomizingGuest) <= 1);
    assert_eq!(
        entries.last().map(|e| e.entry_type),
        Some(TimelineEntryType::VmReady),
        "the VM ready entry comes last: {entries:?}"
    );
    assert_eq!(of(TimelineEntryType::Created), 1);
    assert_eq!(of(TimelineEntryType::Approved), 1);
    assert!(
        entries
            .iter()
            .any(|e| e.details.starts_with("VM ready - IP: 10.0.0."))
    );
}

#[tokio::test]
async fn interrupting_provisioning_at_every_step_then_rerunning_gives_one_vm() {
    let mut interruptions = 0;
    for stop_after in 1.. {
        // The flow has a few dozen steps; far more means it never finishes.
        assert!(
            stop_after <= 1000,
            "provisioning was still pending after 1000 polls"
        );
        let world = world();
        let (service, _, _, _, tenant) = &world;
        let request = service.submit(new_request(tenant, "app01")).await.unwrap();
        service
            .approve(tenant.tenant_id, request, user())
            .await
            .unwrap();

        let mut run = Box::pin(service.provision(tenant.tenant_id, request));
        let mut polls = 0;
        let finished = loop {
            match futures::poll!(run.as_mut()) {
                Poll::Ready(outcome) => {
                    outcome.unwrap();
                    break true;
                }
                Poll::Pending => {
                    polls += 1;
                    if polls == stop_after {
                        break false;
                    }
                }
            }
        };
        drop(run); // the "crash"
        let outcome = within(
            "the rerun after a crash",
            service.provision(tenant.tenant_id, request),
        )
        .await
        .unwrap();
        if finished {
            assert!(matches!(
                outcome,
                ProvisionOutcome::Skipped {
                    status: VmRequestStatus::Ready,
                    ..
                }
            ));
        } else {
            interruptions += 1;
            // A crash after the last append leaves only the timeline to
            // finish; the rerun then reports the request as already done.
            assert!(
                matches!(
                    outcome,
                    ProvisionOutcome::Ready { .. }
                        | ProvisionOutcome::Skipped {
                            status: VmRequestStatus::Ready,
                            ..
                        }
                ),
                "after a crash at step {stop_after}: {outcome:?}"
            );
        }
        assert_exactly_one_vm(&world, request).await;
        if finished {
            break;
        }
    }
    assert!(
        interruptions >= 20,
        "the flow has many steps; only {interruptions} were interrupted"
    );
}

#[tokio::test]
async fn a_clone_that_succeeded_behind_a_failed_call_is_adopted() {
    let world = world();
    let (service, _, _, sim, tenant) = &world;
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Times(1),
        Fault::CreatedButCallFailed,
    ));
    let request = service.submit(new_request(tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    // The lost answer is a connection failure: the request waits (nothing
    // recorded as failed) and the rerun adopts the VM.
    let outcome = within("provisioning", service.provision(tenant.tenant_id, request))
        .await
        .unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Deferred { .. }),
        "{outcome:?}"
    );
    let outcome = within("the rerun", service.provision(tenant.tenant_id, request))
        .await
        .unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(sim.call_count(Operation::CreateVm), 2);
    assert_exactly_one_vm(&world, request).await;
}

/// A vSphere port whose process "dies" right after its first failed
/// `create_vm`: the call never returns to the service, as when the process
/// is killed between the answer and anything done with it.
struct CrashAfterFailedCreate {
    inner: Simulator,
    armed: AtomicBool,
    crashed: tokio::sync::Notify,
}

impl VspherePort for CrashAfterFailedCreate {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        let result = self.inner.create_vm(spec).await;
        if result.is_err() && self.armed.swap(false, Ordering::SeqCst) {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        result
    }
    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        self.inner.get_vm(endpoint, id).await
    }
    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        self.inner.find_vm(spec).await
    }

    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        self.inner.power_off_vm(endpoint, id, owner, mode).await
    }

    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        self.inner.destroy_vm(endpoint, id, owner).await
    }
}

#[tokio::test]
async fn a_crash_after_a_created_but_failed_call_is_adopted_on_rerun() {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let sim = Simulator::default();
    let port = Arc::new(CrashAfterFailedCreate {
        inner: sim.clone(),
        armed: AtomicBool::new(true),
        crashed: tokio::sync::Notify::new(),
    });
    let service = ProvisioningService::new(
        store.clone(),
        port.clone(),
        timeline.clone(),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    // The clone succeeds in vSphere but its answer is lost ...
    sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Times(1),
        Fault::CreatedButCallFailed,
    ));
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    // ... and the process dies before it can look for the VM or retry.
    tokio::select! {
        outcome = service.provision(tenant.tenant_id, request) => {
            panic!("provisioning went on past the crash point: {outcome:?}")
        }
        () = within("the failed create_vm", port.crashed.notified()) => {}
    }
    assert_eq!(sim.vms().len(), 1, "the failed call created the VM");
    let events = store.read_all(tenant.tenant_id, 0, 1000).await.unwrap();
    assert!(
        !events.iter().any(|e| e.event_type == "VmProvisioned"),
        "nothing after the failed call was recorded"
    );
    let before = service
        .request(tenant.tenant_id, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.status, VmRequestStatus::Provisioning);

    // A new process reruns the request: it adopts the VM.
    let outcome = within(
        "the rerun after the crash",
        service.provision(tenant.tenant_id, request),
    )
    .await
    .unwrap();
    let ProvisionOutcome::Ready { vm_id, result } = outcome else {
        panic!("the rerun did not end Ready: {outcome:?}")
    };
    assert_eq!(
        Some(vm_id),
        before.vm_id,
        "the rerun kept the recorded VM id"
    );
    assert_eq!(result.vmware_vm_id, sim.vms()[0].vmware_vm_id);
    assert_eq!(
        sim.call_count(Operation::CreateVm),
        2,
        "one lost call, one adopting call"
    );
    check_one_vm(&service, &store, &timeline, &sim, &tenant, request).await;
}

#[tokio::test]
async fn a_vm_of_the_same_name_that_dvmm_did_not_create_is_never_adopted() {
    let world = world();
    let (service, store, _, sim, tenant) = &world;
    sim.insert_foreign_vm("acme/web", "web-app01");
    let request = service.submit(new_request(tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let outcome = within("provisioning", service.provision(tenant.tenant_id, request))
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            ProvisionOutcome::Failed {
                error: VsphereError::DuplicateName { .. },
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(sim.vms().len(), 1, "no second VM was created");
    assert!(
        sim.vms()[0].dvmm_vm_id.is_none(),
        "the foreign VM is untouched"
    );
    let events = store.read_all(tenant.tenant_id, 0, 100).await.unwrap();
    assert!(!events.iter().any(|e| e.event_type == "VmProvisioned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_commands_for_one_request_make_one_vm() {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let sim = Simulator::default();
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        sim.clone(),
        timeline.clone(),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    ));
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let service = service.clone();
            let tenant_id = tenant.tenant_id;
            tokio::spawn(async move { service.provision(tenant_id, request).await })
        })
        .collect();
    let mut ready = 0;
    for task in tasks {
        match within("one of eight concurrent provisionings", task)
            .await
            .unwrap()
            .unwrap()
        {
            ProvisionOutcome::Ready { .. } => ready += 1,
            ProvisionOutcome::Skipped { .. } => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert!(ready >= 1);
    assert_eq!(sim.vms().len(), 1, "exactly one clone");
    let events = store.read_all(tenant.tenant_id, 0, 1000).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "VmProvisioned")
            .count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "VmRequestReady")
            .count(),
        1
    );
    let entries = timeline.list(tenant.tenant_id, request).await.unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.entry_type == TimelineEntryType::VmReady)
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_never_reports_an_ip_is_ready_with_ip_pending_after_the_timeout() {
    let tenant = tenant_config("acme", 120);
    let sim = Simulator::default();
    sim.set_ip_mode(dvmm::vsphere::sim::IpMode::Never);
    let timeline = Arc::new(MemoryTimeline::new());
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        sim.clone(),
        timeline.clone(),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // Paused time: the two-minute IP wait passes at once, the deadline too
    // if the wait never ends.
    let outcome = tokio::time::timeout(
        Duration::from_secs(600),
        service.provision(tenant.tenant_id, request),
    )
    .await
    .expect("provisioning ended within 10 minutes of paused time")
    .unwrap();
    assert_eq!(
        started.elapsed().as_secs(),
        120,
        "waited the configured 2 minutes"
    );
    let ProvisionOutcome::Ready { vm_id, result } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(result.ip_address, None);
    assert_eq!(
        result.warning_message.as_deref(),
        Some("IP detection timed out")
    );
    let entries = timeline.list(tenant.tenant_id, request).await.unwrap();
    assert_eq!(entries.last().unwrap().details, "VM ready (IP pending)");
    // Later the guest reports an IP and the user refreshes.
    sim.set_guest_ip(&result.vmware_vm_id, Some("10.0.0.250".parse().unwrap()));
    let vm = service
        .refresh_guest_info(tenant.tenant_id, vm_id)
        .await
        .unwrap();
    assert_eq!(vm.ip_address, Some("10.0.0.250".parse().unwrap()));
    let entries = timeline.list(tenant.tenant_id, request).await.unwrap();
    assert_eq!(
        entries.last().unwrap().details,
        "Guest info refreshed - IP: 10.0.0.250"
    );
}
