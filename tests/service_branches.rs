//! The service's branches with a mocked vSphere port (mockall) and the memory
//! store: every outcome, retries, conflicts, idempotency, resumption.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{new_request, tenant_config, user};
use dvmm::core::VmId;
use dvmm::core::config::VcenterEndpoint;
use dvmm::core::ports::{PowerOffMode, PowerOffOutcome};
use dvmm::core::provisioning::request_stream;
use dvmm::core::spec::{IP_TIMEOUT_WARNING, PowerState, VmGuestInfo};
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::{
    AppendOutcome, DomainEvent, EventStore, NewEvent, ProvisionOutcome, ProvisioningService,
    ServiceError, StoreError, StoredEvent, StreamId, TenantConfig, TenantId, Tenants,
    TimelineEntryType, VmProvisioningResult, VmRequestEvent, VmRequestStatus, VmSpec, VmStatus,
    VmwareVmId, VsphereError, VspherePort,
};
use mockall::predicate::always;
use mockall::{Sequence, mock};

mock! {
    pub Vsphere {
        fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError>;
        fn get_vm(&self, endpoint: &VcenterEndpoint, id: &VmwareVmId) -> Result<VmGuestInfo, VsphereError>;
        fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError>;
        fn power_off_vm(&self, endpoint: &VcenterEndpoint, id: &VmwareVmId, owner: VmId, mode: PowerOffMode) -> Result<PowerOffOutcome, VsphereError>;
        fn destroy_vm(&self, endpoint: &VcenterEndpoint, id: &VmwareVmId, owner: VmId) -> Result<(), VsphereError>;
    }
}

/// Adapts the synchronous mock to the async port.
struct MockPort(MockVsphere);

impl VspherePort for MockPort {
    fn create_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        let result = self.0.create_vm(spec);
        async move { result }
    }

    fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send {
        let result = self.0.get_vm(endpoint, id);
        async move { result }
    }

    fn find_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<Option<VmGuestInfo>, VsphereError>> + Send {
        let result = self.0.find_vm(spec);
        async move { result }
    }

    fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> impl Future<Output = Result<PowerOffOutcome, VsphereError>> + Send {
        let result = self.0.power_off_vm(endpoint, id, owner, mode);
        async move { result }
    }

    fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> impl Future<Output = Result<(), VsphereError>> + Send {
        let result = self.0.destroy_vm(endpoint, id, owner);
        async move { result }
    }
}

type Service = ProvisioningService<Arc<MemoryEventStore>, MockPort, Arc<MemoryTimeline>>;

struct Harness {
    service: Service,
    tenant: TenantConfig,
}

fn harness(mock: MockVsphere) -> Harness {
    // These mocks script provisioning calls only: failed VMs are kept, so
    // no cleanup calls vSphere after a failure.
    let tenant = TenantConfig {
        on_failure: dvmm::core::config::OnFailure::Keep,
        ..tenant_config("acme", 120)
    };
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        MockPort(mock),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    Harness { service, tenant }
}

fn ready(ip: Option<&str>) -> VmProvisioningResult {
    VmProvisioningResult {
        vmware_vm_id: VmwareVmId::new("vm-1042"),
        ip_address: ip.map(|ip| ip.parse::<IpAddr>().unwrap()),
        hostname: "web-app01".into(),
        warning_message: ip.is_none().then(|| IP_TIMEOUT_WARNING.to_owned()),
    }
}

impl Harness {
    async fn approved_request(&self) -> dvmm::VmRequestId {
        let id = self
            .service
            .submit(new_request(&self.tenant, "app01"))
            .await
            .unwrap();
        self.service
            .approve(self.tenant.tenant_id, id, user())
            .await
            .unwrap();
        id
    }

    async fn event_types(&self) -> Vec<String> {
        self.service
            .store()
            .read_all(self.tenant.tenant_id, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    async fn timeline(&self, id: dvmm::VmRequestId) -> Vec<(TimelineEntryType, String)> {
        self.service
            .timeline(self.tenant.tenant_id, id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.entry_type, e.details))
            .collect()
    }
}

#[tokio::test]
async fn success_with_ip_records_both_streams_and_the_timeline() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm()
        .withf(|spec: &VmSpec| {
            spec.name.as_str() == "web-app01"
                && spec.hostname.as_str() == "web-app01"
                && spec.folder_path == "acme/web"
                && spec.resources.cpu == 2
                && spec.resources.memory_mib == 4096
                && spec.resources.disk_gib == 40
                && spec.template == "ubuntu-22.04-template"
                && spec.network == "VM Network"
                && spec.ip_wait_timeout.as_secs() == 120
        })
        .times(1)
        .returning(|_| Ok(ready(Some("10.1.2.3"))));
    let h = harness(mock);
    let id = h.approved_request().await;
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    let ProvisionOutcome::Ready { vm_id, result } = outcome else {
        panic!("expected Ready, got {outcome:?}")
    };
    assert_eq!(result.ip_address, Some("10.1.2.3".parse().unwrap()));
    assert_eq!(
        h.event_types().await,
        [
            "VmRequestCreated",
            "VmRequestApproved",
            "VmRequestProvisioningStarted",
            "VmProvisioningStarted",
            "VmProvisioned",
            "VmRequestReady"
        ]
    );
    let request = h
        .service
        .request(h.tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, VmRequestStatus::Ready);
    let vm = h
        .service
        .vm(h.tenant.tenant_id, vm_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(vm.status, VmStatus::Ready);
    assert_eq!(vm.vmware_vm_id, Some(VmwareVmId::new("vm-1042")));
    let timeline = h.timeline(id).await;
    let types: Vec<_> = timeline.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        types,
        [
            TimelineEntryType::Created,
            TimelineEntryType::Approved,
            TimelineEntryType::ProvisioningStarted,
            TimelineEntryType::VmReady
        ]
    );
    assert_eq!(timeline[3].1, "VM ready - IP: 10.1.2.3");
}

#[tokio::test]
async fn success_without_ip_is_ready_with_a_warning() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm()
        .times(1)
        .returning(|_| Ok(ready(None)));
    let h = harness(mock);
    let id = h.approved_request().await;
    let ProvisionOutcome::Ready { vm_id, result } =
        h.service.provision(h.tenant.tenant_id, id).await.unwrap()
    else {
        panic!("expected Ready")
    };
    assert_eq!(result.ip_address, None);
    assert_eq!(
        result.warning_message.as_deref(),
        Some("IP detection timed out")
    );
    let vm = h
        .service
        .vm(h.tenant.tenant_id, vm_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        vm.warning_message.as_deref(),
        Some("IP detection timed out")
    );
    assert_eq!(
        h.timeline(id).await.last().unwrap(),
        &(
            TimelineEntryType::VmReady,
            "VM ready (IP pending)".to_owned()
        )
    );
}

#[tokio::test]
async fn a_permanent_failure_is_recorded_with_an_actionable_message() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm().times(1).returning(|_| {
        Err(VsphereError::NotFound {
            kind: "template".into(),
            name: "ubuntu-22.04-template".into(),
        })
    });
    mock.expect_find_vm().never();
    let h = harness(mock);
    let id = h.approved_request().await;
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(
            &outcome,
            ProvisionOutcome::Failed {
                error: VsphereError::NotFound { .. },
                ..
            }
        ),
        "{outcome:?}"
    );
    let types = h.event_types().await;
    assert!(types.contains(&"VmProvisioningFailed".to_owned()));
    assert_eq!(types.last().unwrap(), "VmRequestProvisioningFailed");
    let request = h
        .service
        .request(h.tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, VmRequestStatus::Failed);
    let failure = request.failure.unwrap();
    assert_eq!(failure.error_code, "NotFound");
    assert!(!failure.retryable);
    let (kind, details) = h.timeline(id).await.pop().unwrap();
    assert_eq!(kind, TimelineEntryType::ProvisioningFailed);
    assert!(
        details.contains("template \"ubuntu-22.04-template\""),
        "{details}"
    );
    assert!(details.contains("retrying will not help"), "{details}");
}

#[tokio::test]
async fn a_transient_failure_is_retried_after_checking_for_the_vm() {
    let mut mock = MockVsphere::new();
    let mut seq = Sequence::new();
    mock.expect_create_vm()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| {
            Err(VsphereError::Transport {
                message: "connection reset".into(),
            })
        });
    mock.expect_create_vm()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(ready(Some("10.0.0.7"))));
    let h = harness(mock);
    let id = h.approved_request().await;
    // An unreachable vCenter defers the request instead of failing it; the
    // rerun (the runner's job) finishes it.
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Deferred { .. }),
        "{outcome:?}"
    );
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    let types = h.event_types().await;
    assert_eq!(types.iter().filter(|t| *t == "VmProvisioned").count(), 1);
    assert!(!types.iter().any(|t| t.contains("Failed")));
}

#[tokio::test]
async fn transient_failures_that_persist_fail_as_retryable() {
    let mut mock = MockVsphere::new();
    // One call per provisioning: retrying is the runner's job.
    mock.expect_create_vm().times(1).returning(|_| {
        Err(VsphereError::Timeout {
            operation: "CloneVM_Task".into(),
        })
    });
    let h = harness(mock);
    let id = h.approved_request().await;
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert!(matches!(
        outcome,
        ProvisionOutcome::Failed {
            error: VsphereError::Timeout { .. },
            ..
        }
    ));
    let request = h
        .service
        .request(h.tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    assert!(request.failure.unwrap().retryable);
    let (_, details) = h.timeline(id).await.pop().unwrap();
    assert!(details.contains("retrying may help"), "{details}");
}

#[tokio::test]
async fn a_second_command_does_nothing_and_says_why() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm()
        .times(1)
        .returning(|_| Ok(ready(Some("10.1.2.3"))));
    let h = harness(mock);
    let id = h.approved_request().await;
    h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    let again = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert_eq!(
        again,
        ProvisionOutcome::Skipped {
            status: VmRequestStatus::Ready,
            reason: "the VM is already provisioned".into()
        }
    );
    assert_eq!(h.event_types().await.len(), 6, "nothing new was written");
}

#[tokio::test]
async fn requests_that_are_not_approved_are_not_provisioned() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm().never();
    let h = harness(mock);
    let pending = h
        .service
        .submit(new_request(&h.tenant, "a1"))
        .await
        .unwrap();
    let outcome = h
        .service
        .provision(h.tenant.tenant_id, pending)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        ProvisionOutcome::Skipped {
            status: VmRequestStatus::Pending,
            ..
        }
    ));

    let rejected = h
        .service
        .submit(new_request(&h.tenant, "a2"))
        .await
        .unwrap();
    h.service
        .reject(h.tenant.tenant_id, rejected, user(), "no budget")
        .await
        .unwrap();
    let outcome = h
        .service
        .provision(h.tenant.tenant_id, rejected)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        ProvisionOutcome::Skipped {
            status: VmRequestStatus::Rejected,
            ..
        }
    ));
    assert_eq!(
        h.timeline(rejected).await.last().unwrap(),
        &(
            TimelineEntryType::Rejected,
            "Rejected: no budget".to_owned()
        )
    );

    let cancelled = h
        .service
        .submit(new_request(&h.tenant, "a3"))
        .await
        .unwrap();
    h.service
        .approve(h.tenant.tenant_id, cancelled, user())
        .await
        .unwrap();
    h.service
        .cancel(
            h.tenant.tenant_id,
            cancelled,
            user(),
            Some("not needed".into()),
        )
        .await
        .unwrap();
    let outcome = h
        .service
        .provision(h.tenant.tenant_id, cancelled)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        ProvisionOutcome::Skipped {
            status: VmRequestStatus::Cancelled,
            ..
        }
    ));

    let missing = dvmm::VmRequestId::from_uuid(uuid::Uuid::new_v4());
    let err = h
        .service
        .provision(h.tenant.tenant_id, missing)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::RequestNotFound(id) if id == missing));
}

#[tokio::test]
async fn bad_input_is_a_typed_error_that_names_the_part() {
    let h = harness(MockVsphere::new());
    let mut request = new_request(&h.tenant, "App_01");
    let err = h.service.submit(request.clone()).await.unwrap_err();
    assert!(err.to_string().contains("requested VM name"), "{err}");
    request.requested_name = "app01".into();
    request.project_prefix = "-web".into();
    let err = h.service.submit(request.clone()).await.unwrap_err();
    assert!(err.to_string().contains("project prefix"), "{err}");
    request.tenant_id = TenantId::from_uuid(uuid::Uuid::new_v4());
    let err = h.service.submit(request).await.unwrap_err();
    assert!(matches!(err, ServiceError::UnknownTenant(_)));
    // Approving twice is an illegal transition and writes nothing.
    let id = h.approved_request().await;
    let err = h
        .service
        .approve(h.tenant.tenant_id, id, user())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot approve"), "{err}");
    assert_eq!(h.event_types().await.len(), 2);
}

#[tokio::test]
async fn an_interrupted_provisioning_is_resumed_with_the_recorded_vm_id() {
    let mut mock = MockVsphere::new();
    mock.expect_find_vm().returning(|_| Ok(None));
    let recorded = Arc::new(std::sync::Mutex::new(None));
    let seen = recorded.clone();
    mock.expect_create_vm().times(1).returning(move |spec| {
        *seen.lock().unwrap() = Some(spec.vm_id);
        Ok(ready(Some("10.1.2.3")))
    });
    let h = harness(mock);
    let id = h.approved_request().await;
    // Simulate a crash right after the claim: the request says Provisioning
    // with a VM id, nothing else was written.
    let loaded = h
        .service
        .store()
        .load(h.tenant.tenant_id, &request_stream(id))
        .await
        .unwrap();
    let vm_id = dvmm::VmId::from_uuid(uuid::Uuid::new_v4());
    let started = VmRequestEvent::VmRequestProvisioningStarted(
        dvmm::core::vm_request::VmRequestProvisioningStarted { vm_id },
    );
    let mut metadata = loaded.last().unwrap().metadata.clone();
    metadata.event_id = dvmm::EventId::from_uuid(uuid::Uuid::new_v4());
    h.service
        .store()
        .append(
            h.tenant.tenant_id,
            &request_stream(id),
            2,
            vec![started.to_new_event(metadata)],
        )
        .await
        .unwrap();
    let outcome = h.service.provision(h.tenant.tenant_id, id).await.unwrap();
    assert!(matches!(outcome, ProvisionOutcome::Ready { vm_id: v, .. } if v == vm_id));
    assert_eq!(
        *recorded.lock().unwrap(),
        Some(vm_id),
        "the recorded VM id is reused"
    );
    // The timeline shows the start that the "crashed" run never recorded.
    let types: Vec<_> = h.timeline(id).await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        types,
        [
            TimelineEntryType::Created,
            TimelineEntryType::Approved,
            TimelineEntryType::ProvisioningStarted,
            TimelineEntryType::VmReady
        ]
    );
}

#[tokio::test]
async fn refresh_finds_the_ip_later_and_records_it_once() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm()
        .times(1)
        .returning(|_| Ok(ready(None)));
    mock.expect_get_vm()
        .with(always(), mockall::predicate::eq(VmwareVmId::new("vm-1042")))
        .times(2)
        .returning(|_, id| {
            Ok(VmGuestInfo {
                vmware_vm_id: id.clone(),
                name: "web-app01".into(),
                dvmm_vm_id: None,
                power_state: PowerState::PoweredOn,
                tools_running: true,
                ip_address: Some("10.9.8.7".parse().unwrap()),
                hostname: Some("web-app01".into()),
            })
        });
    let h = harness(mock);
    let id = h.approved_request().await;
    let ProvisionOutcome::Ready { vm_id, .. } =
        h.service.provision(h.tenant.tenant_id, id).await.unwrap()
    else {
        panic!()
    };
    let vm = h
        .service
        .refresh_guest_info(h.tenant.tenant_id, vm_id)
        .await
        .unwrap();
    assert_eq!(vm.ip_address, Some("10.9.8.7".parse().unwrap()));
    assert_eq!(vm.status, VmStatus::Running);
    assert_eq!(vm.warning_message, None);
    let vm = h
        .service
        .refresh_guest_info(h.tenant.tenant_id, vm_id)
        .await
        .unwrap();
    assert_eq!(vm.status, VmStatus::Running);
    let types = h.event_types().await;
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "VmGuestInfoRefreshed")
            .count(),
        1
    );
    assert_eq!(
        h.timeline(id).await.last().unwrap(),
        &(
            TimelineEntryType::GuestInfoRefreshed,
            "Guest info refreshed - IP: 10.9.8.7".to_owned()
        )
    );
}

#[tokio::test]
async fn refresh_of_a_vm_that_is_not_provisioned_is_a_typed_error() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm().returning(|_| {
        Err(VsphereError::InsufficientResources {
            message: "datastore full".into(),
        })
    });
    mock.expect_get_vm().never();
    let h = harness(mock);
    let id = h.approved_request().await;
    let ProvisionOutcome::Failed { vm_id, .. } =
        h.service.provision(h.tenant.tenant_id, id).await.unwrap()
    else {
        panic!()
    };
    let err = h
        .service
        .refresh_guest_info(h.tenant.tenant_id, vm_id)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ServiceError::VmNotProvisioned {
                status: VmStatus::Failed,
                ..
            }
        ),
        "{err:?}"
    );
    let (_, details) = h.timeline(id).await.pop().unwrap();
    assert!(details.contains("choose a smaller size"), "{details}");
}

/// A store that can answer appends with `Conflict` (as if a concurrent
/// writer got there first) or fail once after letting some appends through.
struct ContendedStore {
    inner: MemoryEventStore,
    conflicts: AtomicUsize,
    /// When non-zero: let this many - 1 appends through, then fail one.
    fail_after: AtomicUsize,
    /// A competing writer's event that lands just before our next append to
    /// that stream.
    competing: std::sync::Mutex<Option<(StreamId, NewEvent)>>,
}

impl ContendedStore {
    fn new() -> Self {
        Self {
            inner: MemoryEventStore::new(),
            conflicts: AtomicUsize::new(0),
            fail_after: AtomicUsize::new(0),
            competing: std::sync::Mutex::new(None),
        }
    }
}

impl EventStore for ContendedStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        if self.fail_after.load(Ordering::SeqCst) > 0
            && self.fail_after.fetch_sub(1, Ordering::SeqCst) == 1
        {
            return Err(StoreError::Backend {
                operation: "append",
                message: "connection lost".into(),
                retryable: true,
                source: None,
            });
        }
        let competitor = {
            let mut competing = self.competing.lock().unwrap();
            match competing.take() {
                Some((s, event)) if &s == stream => Some(event),
                other => {
                    *competing = other;
                    None
                }
            }
        };
        if let Some(event) = competitor {
            self.inner
                .append(tenant, stream, expected_version, vec![event])
                .await?;
        }
        if self.conflicts.load(Ordering::SeqCst) > 0 {
            self.conflicts.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected: expected_version,
                actual: None,
            });
        }
        self.inner
            .append(tenant, stream, expected_version, events)
            .await
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.load(tenant, stream).await
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(tenant, after, limit).await
    }
}

type ContendedService = ProvisioningService<Arc<ContendedStore>, MockPort, Arc<MemoryTimeline>>;

fn contended_service(mock: MockVsphere) -> (ContendedService, Arc<ContendedStore>, TenantConfig) {
    let tenant = tenant_config("acme", 120);
    let store = Arc::new(ContendedStore::new());
    let service = ProvisioningService::new(
        store.clone(),
        MockPort(mock),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    );
    (service, store, tenant)
}

#[tokio::test]
async fn conflicts_are_retried_by_reloading_not_surfaced() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm()
        .times(1)
        .returning(|_| Ok(ready(Some("10.1.2.3"))));
    let (service, store, tenant) = contended_service(mock);
    store.conflicts.store(2, Ordering::SeqCst);
    let id = service.submit(new_request(&tenant, "app01")).await.unwrap();
    store.conflicts.store(3, Ordering::SeqCst);
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    let outcome = service.provision(tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    let request = service
        .request(tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, VmRequestStatus::Ready);
}

#[tokio::test]
async fn losing_the_claim_to_another_caller_skips() {
    let mut mock = MockVsphere::new();
    mock.expect_create_vm().never();
    let (service, store, tenant) = contended_service(mock);
    let id = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    // Another caller's claim lands between our load and our append.
    let loaded = store
        .inner
        .load(tenant.tenant_id, &request_stream(id))
        .await
        .unwrap();
    let mut metadata = loaded.last().unwrap().metadata.clone();
    metadata.event_id = dvmm::EventId::from_uuid(uuid::Uuid::new_v4());
    let other_vm = dvmm::VmId::from_uuid(uuid::Uuid::new_v4());
    let started = VmRequestEvent::VmRequestProvisioningStarted(
        dvmm::core::vm_request::VmRequestProvisioningStarted { vm_id: other_vm },
    );
    *store.competing.lock().unwrap() = Some((request_stream(id), started.to_new_event(metadata)));
    let outcome = service.provision(tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(
            outcome,
            ProvisionOutcome::Skipped {
                status: VmRequestStatus::Provisioning,
                ..
            }
        ),
        "{outcome:?}"
    );
    let request = service
        .request(tenant.tenant_id, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.vm_id, Some(other_vm), "the winner's claim stands");
}

#[tokio::test]
async fn a_store_failure_after_the_clone_is_an_error_and_a_rerun_adopts() {
    let mut mock = MockVsphere::new();
    // The rerun calls create_vm again with the same VM id: the port's
    // contract is to adopt the VM it finds carrying that id.
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ids.clone();
    mock.expect_create_vm().times(2).returning(move |spec| {
        seen.lock().unwrap().push(spec.vm_id);
        Ok(ready(Some("10.1.2.3")))
    });
    mock.expect_find_vm().returning(|_| Ok(None));
    let (service, store, tenant) = contended_service(mock);
    let id = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service.approve(tenant.tenant_id, id, user()).await.unwrap();
    // Appends of provision: claim, VM start, VmProvisioned (fails).
    store.fail_after.store(3, Ordering::SeqCst);
    let err = service.provision(tenant.tenant_id, id).await.unwrap_err();
    assert!(
        matches!(
            err,
            ServiceError::Store(StoreError::Backend {
                retryable: true,
                ..
            })
        ),
        "{err:?}"
    );
    let outcome = service.provision(tenant.tenant_id, id).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    let asked = ids.lock().unwrap().clone();
    assert_eq!(asked[0], asked[1], "the rerun asks for the same VM");
    let types: Vec<_> = store
        .inner
        .read_all(tenant.tenant_id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types.iter().filter(|t| *t == "VmProvisioned").count(), 1);
    assert_eq!(types.iter().filter(|t| *t == "VmRequestReady").count(), 1);
}
