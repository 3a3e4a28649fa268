//! "Customizing guest" on the timeline: written when the vSphere port starts
//! waiting for the guest's customization outcome, once per attempt however
//! often a resume passes that point, and always followed by the outcome as
//! the last entry. Simulated time: the simulator's guest customizes for 30 s.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{
    Fault, FaultRule, GuestCustomization, Operation, Simulator, SimulatorConfig,
};
use dvmm::{
    AppendOutcome, EventStore, NewEvent, ProvisionOutcome, ProvisioningService, StoreError,
    StoredEvent, StreamId, TenantConfig, TenantId, Tenants, TimelineEntryType, TimelineSink,
    VmRequestId, VmRequestStatus, VsphereError,
};

/// Simulated time the tests give one provisioning (the guest takes 30 s).
const DEADLINE: Duration = Duration::from_secs(900);

fn simulator() -> Simulator {
    Simulator::new(SimulatorConfig {
        customization: GuestCustomization {
            duration: Duration::from_secs(30),
            pre_customization_ip: Some("198.18.9.1".parse().expect("an IPv4 address")),
        },
        ..SimulatorConfig::default()
    })
}

type Service<S> = ProvisioningService<S, Simulator, Arc<MemoryTimeline>>;

fn service<S: EventStore>(
    store: S,
    sim: &Simulator,
    tenant: &TenantConfig,
) -> (Service<S>, Arc<MemoryTimeline>) {
    let timeline = Arc::new(MemoryTimeline::new());
    let service = ProvisioningService::new(
        store,
        sim.clone(),
        timeline.clone(),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    (service, timeline)
}

async fn approved<S: EventStore>(service: &Service<S>, tenant: &TenantConfig) -> VmRequestId {
    let request = service
        .submit(new_request(tenant, "app01"))
        .await
        .expect("submit");
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .expect("approve");
    request
}

async fn entry_types(
    timeline: &MemoryTimeline,
    tenant: TenantId,
    request: VmRequestId,
) -> Vec<TimelineEntryType> {
    timeline
        .list(tenant, request)
        .await
        .expect("timeline")
        .iter()
        .map(|e| e.entry_type)
        .collect()
}

async fn provision<S: EventStore>(
    service: &Service<S>,
    tenant: TenantId,
    request: VmRequestId,
) -> ProvisionOutcome {
    tokio::time::timeout(DEADLINE, service.provision(tenant, request))
        .await
        .expect("the provisioning within 900 s of simulated time")
        .expect("provision")
}

/// A provisioning 10 s into its guest's 30 s customization.
struct Customizing {
    tenant: TenantConfig,
    sim: Simulator,
    service: Arc<Service<Arc<MemoryEventStore>>>,
    timeline: Arc<MemoryTimeline>,
    request: VmRequestId,
    run: tokio::task::JoinHandle<ProvisionOutcome>,
}

async fn ten_seconds_into_customization() -> Customizing {
    let tenant = tenant_config("acme", 120);
    let sim = simulator();
    let (service, timeline) = service(Arc::new(MemoryEventStore::new()), &sim, &tenant);
    let service = Arc::new(service);
    let request = approved(&service, &tenant).await;
    let run = tokio::spawn({
        let service = service.clone();
        let tenant = tenant.tenant_id;
        async move { provision(&service, tenant, request).await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    Customizing {
        tenant,
        sim,
        service,
        timeline,
        request,
        run,
    }
}

use TimelineEntryType::{
    Approved, Created, CustomizingGuest, ProvisioningFailed, ProvisioningStarted, VmReady,
};

#[tokio::test(start_paused = true)]
async fn the_timeline_says_customizing_while_the_guest_customizes_and_ends_with_ready() {
    let Customizing {
        tenant,
        sim,
        service,
        timeline,
        request,
        run,
    } = ten_seconds_into_customization().await;
    assert!(!run.is_finished(), "ready before the guest customized");
    assert_eq!(
        entry_types(&timeline, tenant.tenant_id, request).await,
        [Created, Approved, ProvisioningStarted, CustomizingGuest],
        "while the guest customizes, the timeline says so"
    );
    let request_now = service
        .request(tenant.tenant_id, request)
        .await
        .expect("load")
        .expect("the request");
    assert_eq!(request_now.status, VmRequestStatus::Provisioning);
    assert!(request_now.customizing_guest);

    let outcome = run.await.expect("the provisioning task");
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    let entries = timeline
        .list(tenant.tenant_id, request)
        .await
        .expect("timeline");
    let types: Vec<_> = entries.iter().map(|e| e.entry_type).collect();
    assert_eq!(
        types,
        [
            Created,
            Approved,
            ProvisioningStarted,
            CustomizingGuest,
            VmReady
        ]
    );
    assert_eq!(
        entries[3].fields.vm_id, request_now.vm_id,
        "the entry names the VM being customized"
    );
    assert_eq!(sim.vms().len(), 1);
    assert!(
        entries[4].details.starts_with("VM ready - IP: 10.0.0."),
        "the address after customization, not the template's: {}",
        entries[4].details
    );
}

/// A process that dies while its guest customizes leaves "Customizing
/// guest" on the timeline; the run that resumes passes the same point and
/// records nothing more.
#[tokio::test(start_paused = true)]
async fn a_resume_during_customization_records_it_once() {
    let Customizing {
        tenant,
        sim,
        service,
        timeline,
        request,
        run,
    } = ten_seconds_into_customization().await;
    run.abort(); // the crash
    assert!(run.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(
        entry_types(&timeline, tenant.tenant_id, request).await,
        [Created, Approved, ProvisioningStarted, CustomizingGuest]
    );

    let outcome = provision(&service, tenant.tenant_id, request).await;
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(sim.vms().len(), 1, "the VM was adopted, not cloned again");
    assert_eq!(
        entry_types(&timeline, tenant.tenant_id, request).await,
        [
            Created,
            Approved,
            ProvisioningStarted,
            CustomizingGuest,
            VmReady
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_customization_comes_after_the_customizing_entry() {
    let mut tenant = tenant_config("acme", 120);
    tenant.on_failure = Default::default();
    let sim = simulator();
    sim.add_fault(FaultRule::times(
        Operation::Customize,
        1,
        Fault::Error(VsphereError::CustomizationFailed {
            event: "CustomizationLinuxIdentityFailed".into(),
            reason: None,
        }),
    ));
    let (service, timeline) = service(Arc::new(MemoryEventStore::new()), &sim, &tenant);
    let request = approved(&service, &tenant).await;

    let outcome = provision(&service, tenant.tenant_id, request).await;
    assert!(
        matches!(outcome, ProvisionOutcome::Failed { .. }),
        "{outcome:?}"
    );
    let types = entry_types(&timeline, tenant.tenant_id, request).await;
    assert_eq!(
        types[..5],
        [
            Created,
            Approved,
            ProvisioningStarted,
            CustomizingGuest,
            ProvisioningFailed
        ],
        "{types:?}"
    );
}

/// A tenant that does not wait for the customization outcome
/// (`customization_secs = 0`) is not told its guest is being customized.
#[tokio::test(start_paused = true)]
async fn no_customizing_entry_when_the_tenant_does_not_wait_for_it() {
    let mut tenant = tenant_config("acme", 120);
    tenant.timeouts.customization_secs = 0;
    let sim = simulator();
    let (service, timeline) = service(Arc::new(MemoryEventStore::new()), &sim, &tenant);
    let request = approved(&service, &tenant).await;

    let outcome = provision(&service, tenant.tenant_id, request).await;
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        entry_types(&timeline, tenant.tenant_id, request).await,
        [Created, Approved, ProvisioningStarted, VmReady]
    );
}

/// An event store that refuses to append the customizing event, as a store
/// that fails at just that moment would.
struct RefusesCustomizing(Arc<MemoryEventStore>);

impl EventStore for RefusesCustomizing {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        if events
            .iter()
            .any(|e| e.event_type == "VmRequestCustomizingGuest")
        {
            return Err(StoreError::Backend {
                operation: "append",
                message: "connection lost".into(),
                retryable: true,
                source: None,
            });
        }
        self.0
            .append(tenant, stream, expected_version, events)
            .await
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.load(tenant, stream).await
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.read_all(tenant, after, limit).await
    }
}

/// Progress is information: a store failure while recording it is logged,
/// and the provisioning goes on to its outcome.
#[tokio::test(start_paused = true)]
async fn a_store_failure_recording_progress_does_not_stop_the_provisioning() {
    let tenant = tenant_config("acme", 120);
    let sim = simulator();
    let (service, timeline) = service(
        RefusesCustomizing(Arc::new(MemoryEventStore::new())),
        &sim,
        &tenant,
    );
    let request = approved(&service, &tenant).await;

    let outcome = provision(&service, tenant.tenant_id, request).await;
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        entry_types(&timeline, tenant.tenant_id, request).await,
        [Created, Approved, ProvisioningStarted, VmReady]
    );
}
