//! The lifecycle after the request on the simulator: cleanup after a
//! failure, retry, decommission and status sync; their events, timeline
//! entries and typed errors; a crash between every two of their steps (the
//! command's future is dropped at each await point in turn, as when a
//! process dies) followed by a rerun that finishes with nothing doubled;
//! the claim that keeps them apart from a provisioning; and the runner
//! retrying a cleanup that failed.

mod common;

use common::PausedClock;

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use common::stepping::Stepping;
use common::{new_request, tenant_config, user};
use dvmm::core::config::OnFailure;
use dvmm::core::ports::{PowerOffOutcome, RequestClaims};
use dvmm::core::provisioning::{CleanupOutcome, DecommissionOutcome, PARTIAL_REMOVED_DETAILS};
use dvmm::core::spec::PowerState;
use dvmm::store::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Fault, FaultRule, Operation, Simulator};
use dvmm::{
    EventStore, ProvisionOutcome, ProvisioningRunner, ProvisioningService, RunnerConfig,
    ServiceError, TenantConfig, TenantId, Tenants, TimelineEntry, TimelineEntryType, TimelineSink,
    TokioTimer, VmId, VmRequestId, VmRequestStatus, VmStatus, VmwareVmId, VsphereError,
};

/// Every wait here is on paused time or the in-process simulator: this
/// only ever fires on a hang.
const DEADLINE: Duration = Duration::from_secs(600);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {DEADLINE:?} waiting for {what}"),
    }
}

type Service = ProvisioningService<
    Stepping<Arc<MemoryEventStore>>,
    Stepping<Simulator>,
    Stepping<Arc<MemoryTimeline>>,
>;

struct World {
    service: Service,
    store: Arc<MemoryEventStore>,
    timeline: Arc<MemoryTimeline>,
    sim: Simulator,
    tenant: TenantConfig,
}

fn world(on_failure: OnFailure) -> World {
    let tenant = TenantConfig {
        on_failure,
        ..tenant_config("acme", 5)
    };
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
    World {
        service,
        store,
        timeline,
        sim,
        tenant,
    }
}

fn customization_failed() -> VsphereError {
    VsphereError::TaskFailed {
        fault: "CustomizationFailed".into(),
        message: "the guest could not be customized".into(),
    }
}

impl World {
    fn t(&self) -> TenantId {
        self.tenant.tenant_id
    }

    async fn approved(&self) -> VmRequestId {
        let request = self
            .service
            .submit(new_request(&self.tenant, "app01"))
            .await
            .unwrap();
        self.service
            .approve(self.t(), request, user())
            .await
            .unwrap();
        request
    }

    /// A request whose provisioning cloned the VM, then failed for good
    /// (customization), leaving the clone powered off.
    async fn failed_with_a_clone(&self) -> (VmRequestId, VmId) {
        self.sim.add_fault(FaultRule::times(
            Operation::CreateVm,
            1,
            Fault::ClonedThenFailed(customization_failed()),
        ));
        let request = self.approved().await;
        // As a runner provisions: the runner removes the clone afterwards,
        // which these tests do themselves.
        let outcome = within(
            "provisioning",
            self.service.provision_as(self.t(), request, "runner-1"),
        )
        .await
        .unwrap();
        let ProvisionOutcome::Failed { vm_id, error } = outcome else {
            panic!("expected a failure: {outcome:?}")
        };
        assert_eq!(error, customization_failed());
        let vms = self.sim.vms();
        assert_eq!(vms.len(), 1, "the failed clone is left: {vms:?}");
        assert_eq!(vms[0].dvmm_vm_id, Some(vm_id));
        (request, vm_id)
    }

    async fn ready(&self) -> (VmRequestId, VmId, VmwareVmId) {
        let request = self.approved().await;
        let outcome = within("provisioning", self.service.provision(self.t(), request))
            .await
            .unwrap();
        let ProvisionOutcome::Ready { vm_id, result } = outcome else {
            panic!("expected ready: {outcome:?}")
        };
        (request, vm_id, result.vmware_vm_id)
    }

    async fn count(&self, event_type: &str) -> usize {
        self.store
            .read_all(self.t(), 0, 10_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.event_type == event_type)
            .count()
    }

    async fn entries(&self, request: VmRequestId) -> Vec<TimelineEntry> {
        self.timeline.list(self.t(), request).await.unwrap()
    }

    async fn entries_of(&self, request: VmRequestId, kind: TimelineEntryType) -> usize {
        self.entries(request)
            .await
            .iter()
            .filter(|e| e.entry_type == kind)
            .count()
    }
}

/// Runs `command` once for every number of polls it can be cut after (the
/// "crash"), each time on a fresh world prepared by `setup`, then reruns it
/// to the end and hands the world and the rerun's result to `check`.
/// Asserts that the command had many points to be cut at.
macro_rules! crash_everywhere {
    (
        $on_failure:expr,
        setup |$ws:ident| $setup:expr,
        command |$wc:ident, $cc:pat_param| $command:expr,
        check |$wk:ident, $ck:pat_param, $rerun:ident, $finished:ident| $check:expr $(,)?
    ) => {{
        let mut interruptions = 0;
        for stop_after in 1.. {
            assert!(
                stop_after <= 500,
                "the command was still pending after 500 polls"
            );
            let w = world($on_failure);
            let ctx = {
                let $ws = &w;
                $setup.await
            };
            let mut run = {
                let $wc = &w;
                let $cc = ctx.clone();
                Box::pin($command)
            };
            let mut polls = 0;
            let finished = loop {
                match futures::poll!(run.as_mut()) {
                    Poll::Ready(result) => {
                        result.expect("the uninterrupted command succeeds");
                        break true;
                    }
                    Poll::Pending => {
                        polls += 1;
                        if polls == stop_after {
                            break false;
                        }
                        // Let paused time move on when the command sleeps.
                        tokio::time::advance(Duration::from_millis(500)).await;
                    }
                }
            };
            drop(run);
            let rerun = {
                let $wc = &w;
                let $cc = ctx.clone();
                within("the rerun after a crash", $command).await
            };
            {
                let $wk = &w;
                let $ck = ctx;
                let $rerun = rerun;
                let $finished = finished;
                $check.await;
            }
            if finished {
                break;
            }
            interruptions += 1;
        }
        assert!(
            interruptions >= 6,
            "only {interruptions} steps were interrupted"
        );
    }};
}

// ---------------------------------------------------------------------------
// Cleanup after a failure.

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_clone_removes_the_partial_vm_after_recording_the_failure() {
    let w = world(OnFailure::Destroy);
    let (request, vm_id) = w.failed_with_a_clone().await;
    let clone = w.sim.vms()[0].vmware_vm_id.clone();

    let outcome = within("cleanup", w.service.cleanup_failed(w.t(), request))
        .await
        .unwrap();
    assert_eq!(outcome, CleanupOutcome::Removed(clone));
    assert!(w.sim.vms().is_empty(), "the partial VM is gone");
    assert_eq!(w.sim.call_count(Operation::DestroyVm), 1);

    let vm = w.service.vm(w.t(), vm_id).await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Failed, "the failure stays the record");
    assert!(vm.failure.is_some());
    let request_state = w.service.request(w.t(), request).await.unwrap().unwrap();
    assert_eq!(request_state.status, VmRequestStatus::Failed);

    let entries = w.entries(request).await;
    let kinds: Vec<_> = entries.iter().map(|e| e.entry_type).collect();
    let failed_at = kinds
        .iter()
        .position(|k| *k == TimelineEntryType::ProvisioningFailed)
        .expect("failure on the timeline");
    let removed_at = kinds
        .iter()
        .position(|k| *k == TimelineEntryType::PartialVmRemoved)
        .expect("removal on the timeline");
    assert!(failed_at < removed_at, "{kinds:?}");
    assert_eq!(entries[removed_at].details, PARTIAL_REMOVED_DETAILS);

    // Again: nothing to do, nothing doubled.
    assert_eq!(
        w.service.cleanup_failed(w.t(), request).await.unwrap(),
        CleanupOutcome::AlreadyDone
    );
    assert_eq!(w.count("VmPartialRemoved").await, 1);
    assert_eq!(w.sim.call_count(Operation::DestroyVm), 1);
}

#[tokio::test(start_paused = true)]
async fn a_direct_provision_removes_the_clone_after_recording_the_failure() {
    let w = world(OnFailure::Destroy);
    w.sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::ClonedThenFailed(customization_failed()),
    ));
    let request = w.approved().await;
    let outcome = w.service.provision(w.t(), request).await.unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Failed { .. }),
        "{outcome:?}"
    );
    assert!(w.sim.vms().is_empty(), "{:?}", w.sim.vms());
    let kinds: Vec<_> = w
        .entries(request)
        .await
        .into_iter()
        .map(|e| e.entry_type)
        .collect();
    let tail = &kinds[kinds.len() - 2..];
    assert_eq!(
        tail,
        [
            TimelineEntryType::ProvisioningFailed,
            TimelineEntryType::PartialVmRemoved
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn keep_leaves_the_failed_vm_for_debugging() {
    let w = world(OnFailure::Keep);
    let (request, _) = w.failed_with_a_clone().await;
    assert_eq!(
        w.service.cleanup_failed(w.t(), request).await.unwrap(),
        CleanupOutcome::Kept
    );
    assert_eq!(w.sim.vms().len(), 1);
    assert_eq!(w.sim.call_count(Operation::PowerOffVm), 0);
    assert_eq!(w.sim.call_count(Operation::DestroyVm), 0);
    assert_eq!(w.count("VmPartialRemoved").await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_any_clone_records_that_nothing_was_left() {
    let w = world(OnFailure::Destroy);
    w.sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::Error(VsphereError::InsufficientResources {
            message: "no memory".into(),
        }),
    ));
    let request = w.approved().await;
    let outcome = w
        .service
        .provision_as(w.t(), request, "runner-1")
        .await
        .unwrap();
    assert!(
        matches!(outcome, ProvisionOutcome::Failed { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        w.service.cleanup_failed(w.t(), request).await.unwrap(),
        CleanupOutcome::NothingLeft
    );
    assert_eq!(w.sim.call_count(Operation::DestroyVm), 0);
    assert_eq!(
        w.entries_of(request, TimelineEntryType::PartialVmRemoved)
            .await,
        0
    );
    assert_eq!(w.count("VmPartialRemoved").await, 1);
    // And for a request that did not fail there is nothing to clean.
    let (ready, _, _) = w.ready().await;
    assert_eq!(
        w.service.cleanup_failed(w.t(), ready).await.unwrap(),
        CleanupOutcome::NotFailed
    );
}

#[tokio::test(start_paused = true)]
async fn cleanup_survives_a_crash_between_any_two_steps() {
    crash_everywhere!(
        OnFailure::Destroy,
        setup | w | async move { w.failed_with_a_clone().await.0 },
        command | w,
        request | async move { w.service.cleanup_failed(w.t(), request).await },
        check | w,
        request,
        rerun,
        _finished
            | async move {
                let rerun = rerun.expect("the rerun succeeds");
                assert!(
                    matches!(
                        rerun,
                        CleanupOutcome::Removed(_) | CleanupOutcome::AlreadyDone
                    ),
                    "{rerun:?}"
                );
                assert!(w.sim.vms().is_empty(), "the partial VM is gone");
                assert_eq!(w.count("VmPartialRemoved").await, 1);
                assert_eq!(w.count("VmProvisioningFailed").await, 1);
                assert_eq!(
                    w.entries_of(request, TimelineEntryType::PartialVmRemoved)
                        .await,
                    1
                );
                assert_eq!(
                    w.entries_of(request, TimelineEntryType::ProvisioningFailed)
                        .await,
                    1
                );
            }
    );
}

// ---------------------------------------------------------------------------
// Retry.

#[tokio::test(start_paused = true)]
async fn retry_runs_a_new_attempt_with_a_new_vm_to_ready() {
    let w = world(OnFailure::Destroy);
    let (request, failed_vm) = w.failed_with_a_clone().await;
    let by = user();
    // The failed attempt's VM is still there: retry removes it first, so
    // the new attempt does not meet it under the same name.
    assert_eq!(w.service.retry(w.t(), request, by).await.unwrap(), 2);
    assert!(w.sim.vms().is_empty());
    let state = w.service.request(w.t(), request).await.unwrap().unwrap();
    assert_eq!(state.status, VmRequestStatus::Approved);
    assert_eq!(state.attempt, 2);
    assert_eq!(state.failed_vm_ids, vec![failed_vm]);
    let entries = w.entries(request).await;
    let last = entries.last().expect("entries");
    assert_eq!(last.entry_type, TimelineEntryType::RetryRequested);
    assert!(
        last.details
            .starts_with(&format!("Retry requested by {by}")),
        "{}",
        last.details
    );

    // A second retry of the same failure is refused.
    let again = w.service.retry(w.t(), request, by).await;
    assert!(
        matches!(
            again,
            Err(ServiceError::NotRetryable {
                status: VmRequestStatus::Approved,
                ..
            })
        ),
        "{again:?}"
    );

    let outcome = w.service.provision(w.t(), request).await.unwrap();
    let ProvisionOutcome::Ready { vm_id, .. } = outcome else {
        panic!("expected ready: {outcome:?}")
    };
    assert_ne!(vm_id, failed_vm, "a new attempt has a new VM id");
    let vms = w.sim.vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].dvmm_vm_id, Some(vm_id));
    let state = w.service.request(w.t(), request).await.unwrap().unwrap();
    assert_eq!(state.status, VmRequestStatus::Ready);
    assert!(state.provisioned_at.is_some());
    assert_eq!(w.count("VmRequestReady").await, 1);
    assert_eq!(w.count("VmRequestProvisioningStarted").await, 2);
}

#[tokio::test(start_paused = true)]
async fn retry_of_a_request_that_did_not_fail_is_a_typed_error() {
    let w = world(OnFailure::Destroy);
    let pending = w
        .service
        .submit(new_request(&w.tenant, "pending01"))
        .await
        .unwrap();
    let (ready, _, _) = w.ready().await;
    for (request, status) in [
        (pending, VmRequestStatus::Pending),
        (ready, VmRequestStatus::Ready),
    ] {
        let result = w.service.retry(w.t(), request, user()).await;
        match result {
            Err(ServiceError::NotRetryable {
                request_id,
                status: found,
            }) => {
                assert_eq!((request_id, found), (request, status));
            }
            other => panic!("expected NotRetryable for {status:?}: {other:?}"),
        }
    }
    assert_eq!(w.count("VmRequestRetried").await, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_survives_a_crash_between_any_two_steps() {
    crash_everywhere!(
        OnFailure::Destroy,
        setup | w | async move { w.failed_with_a_clone().await.0 },
        command | w,
        request | async move { w.service.retry(w.t(), request, user()).await },
        check | w,
        request,
        rerun,
        finished
            | async move {
                match rerun {
                    Ok(attempt) => assert_eq!(attempt, 2),
                    // The crash came after the retry was recorded.
                    Err(ServiceError::NotRetryable {
                        status: VmRequestStatus::Approved,
                        ..
                    }) => {}
                    Err(other) => panic!("rerun: {other:?}"),
                }
                if finished {
                    return;
                }
                assert!(w.sim.vms().is_empty());
                assert_eq!(w.count("VmRequestRetried").await, 1);
                assert_eq!(w.count("VmPartialRemoved").await, 1);
                assert_eq!(
                    w.entries_of(request, TimelineEntryType::RetryRequested)
                        .await,
                    1
                );
                let state = w.service.request(w.t(), request).await.unwrap().unwrap();
                assert_eq!(state.status, VmRequestStatus::Approved);
            }
    );
}

// ---------------------------------------------------------------------------
// Decommission.

#[tokio::test(start_paused = true)]
async fn decommission_powers_off_destroys_and_records_vm_deleted_once() {
    let w = world(OnFailure::Destroy);
    let (request, vm_id, _) = w.ready().await;
    let by = user();
    let outcome = w
        .service
        .decommission(w.t(), vm_id, by, Some("project ended".into()))
        .await
        .unwrap();
    // The guest has Tools running in the simulator: it shuts itself down.
    assert_eq!(
        outcome,
        DecommissionOutcome::Deleted {
            power_off: Some(PowerOffOutcome::GuestShutdown)
        }
    );
    assert!(w.sim.vms().is_empty());
    let vm = w.service.vm(w.t(), vm_id).await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Deleted);
    assert_eq!(vm.deleted_reason.as_deref(), Some("project ended"));
    let entries = w.entries(request).await;
    let last = entries.last().expect("entries");
    assert_eq!(last.entry_type, TimelineEntryType::VmDeleted);
    assert_eq!(last.details, "VM deleted: project ended");
    let stored = w.store.read_all(w.t(), 0, 1000).await.unwrap();
    let deleted = stored
        .iter()
        .find(|e| e.event_type == "VmDeleted")
        .expect("VmDeleted");
    assert_eq!(deleted.metadata.user_id, by, "who decommissioned it");

    assert_eq!(
        w.service
            .decommission(w.t(), vm_id, by, None)
            .await
            .unwrap(),
        DecommissionOutcome::AlreadyDeleted
    );
    assert_eq!(w.count("VmDeleted").await, 1);
    assert_eq!(w.sim.call_count(Operation::DestroyVm), 1);
}

#[tokio::test(start_paused = true)]
async fn a_vm_already_gone_counts_as_deleted() {
    let w = world(OnFailure::Destroy);
    let (_, vm_id, vmware_vm_id) = w.ready().await;
    assert!(w.sim.remove_vm(&vmware_vm_id));
    let outcome = w
        .service
        .decommission(w.t(), vm_id, user(), None)
        .await
        .unwrap();
    assert_eq!(outcome, DecommissionOutcome::Deleted { power_off: None });
    assert_eq!(w.count("VmDeleted").await, 1);
}

#[tokio::test(start_paused = true)]
async fn decommission_is_refused_while_the_vm_is_provisioning() {
    let w = world(OnFailure::Destroy);
    w.sim
        .add_fault(FaultRule::times(Operation::CreateVm, 1, Fault::Transient));
    let request = w.approved().await;
    let outcome = w.service.provision_attempt(w.t(), request).await.unwrap();
    let ProvisionOutcome::Deferred { vm_id, .. } = outcome else {
        panic!("expected a deferred attempt: {outcome:?}")
    };
    let result = w.service.decommission(w.t(), vm_id, user(), None).await;
    assert!(
        matches!(result, Err(ServiceError::VmStillProvisioning { vm_id: v }) if v == vm_id),
        "{result:?}"
    );
    assert_eq!(w.count("VmDeleted").await, 0);
    assert_eq!(w.sim.call_count(Operation::PowerOffVm), 0);
    // Over-long reasons are a typed error, before anything is touched.
    let (_, ready_vm, _) = {
        let other = world(OnFailure::Destroy);
        let ids = other.ready().await;
        let result = other
            .service
            .decommission(other.t(), ids.1, user(), Some("x".repeat(5000)))
            .await;
        assert!(matches!(result, Err(ServiceError::Domain(_))), "{result:?}");
        assert_eq!(other.sim.vms().len(), 1);
        ids
    };
    let _ = ready_vm;
}

#[tokio::test(start_paused = true)]
async fn decommission_survives_a_crash_between_any_two_steps() {
    crash_everywhere!(
        OnFailure::Destroy,
        setup | w | async move { w.ready().await },
        command | w,
        (_, vm_id, _)
            | async move {
                w.service
                    .decommission(w.t(), vm_id, user(), Some("done".into()))
                    .await
            },
        check | w,
        (request, vm_id, _),
        rerun,
        _finished
            | async move {
                let rerun = rerun.expect("the rerun succeeds");
                assert!(
                    matches!(
                        rerun,
                        DecommissionOutcome::Deleted { .. } | DecommissionOutcome::AlreadyDeleted
                    ),
                    "{rerun:?}"
                );
                assert!(w.sim.vms().is_empty());
                assert_eq!(w.count("VmDeleted").await, 1);
                assert_eq!(w.entries_of(request, TimelineEntryType::VmDeleted).await, 1);
                let vm = w.service.vm(w.t(), vm_id).await.unwrap().unwrap();
                assert_eq!(vm.status, VmStatus::Deleted);
            }
    );
}

#[tokio::test(start_paused = true)]
async fn a_command_on_a_request_someone_else_holds_is_refused_naming_the_holder() {
    let tenant = tenant_config("acme", 5);
    let sim = Simulator::default();
    let queue = Arc::new(MemoryWorkQueue::new());
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).unwrap(),
    )
    .with_holder_name("host-a")
    .with_claims(queue.clone(), TokioTimer, Duration::from_secs(30));
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let ProvisionOutcome::Ready { vm_id, .. } =
        service.provision(tenant.tenant_id, request).await.unwrap()
    else {
        panic!("ready")
    };
    // Another process (a provisioning runner, say) holds the claim now.
    queue
        .acquire(
            tenant.tenant_id,
            request,
            "runner-7",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    for result in [
        service
            .decommission(tenant.tenant_id, vm_id, user(), None)
            .await
            .map(|_| ()),
        service
            .sync_status(tenant.tenant_id, vm_id)
            .await
            .map(|_| ()),
    ] {
        match result {
            Err(ServiceError::Claimed { holder, until, .. }) => {
                assert_eq!(holder, "runner-7");
                assert!(until.is_some());
            }
            other => panic!("expected Claimed: {other:?}"),
        }
    }
    assert_eq!(sim.vms().len(), 1, "nothing was touched");
    assert_eq!(sim.call_count(Operation::PowerOffVm), 0);
    assert_eq!(sim.call_count(Operation::GetVm), 0);
}

// ---------------------------------------------------------------------------
// Status sync.

#[tokio::test(start_paused = true)]
async fn sync_status_moves_ready_to_running_then_stopped_with_events_only_on_change() {
    let w = world(OnFailure::Destroy);
    let (request, vm_id, vmware_vm_id) = w.ready().await;

    let vm = w.service.sync_status(w.t(), vm_id).await.unwrap();
    assert_eq!(vm.status, VmStatus::Running, "first observation: running");
    assert_eq!(w.count("VmPowerStateObserved").await, 1);
    let vm = w.service.sync_status(w.t(), vm_id).await.unwrap();
    assert_eq!(vm.status, VmStatus::Running);
    assert_eq!(
        w.count("VmPowerStateObserved").await,
        1,
        "no change, no event"
    );

    assert!(w.sim.set_power_state(&vmware_vm_id, PowerState::PoweredOff));
    let vm = w.service.sync_status(w.t(), vm_id).await.unwrap();
    assert_eq!(vm.status, VmStatus::Stopped);
    assert!(w.sim.set_power_state(&vmware_vm_id, PowerState::Suspended));
    let vm = w.service.sync_status(w.t(), vm_id).await.unwrap();
    assert_eq!(vm.status, VmStatus::Stopped, "suspended counts as stopped");
    assert_eq!(w.count("VmPowerStateObserved").await, 2);

    let details: Vec<_> = w
        .entries(request)
        .await
        .into_iter()
        .filter(|e| e.entry_type == TimelineEntryType::StatusChanged)
        .map(|e| e.details)
        .collect();
    assert_eq!(details, vec!["VM running", "VM stopped"]);

    // Gone from vCenter: a typed error, nothing recorded.
    assert!(w.sim.remove_vm(&vmware_vm_id));
    let result = w.service.sync_status(w.t(), vm_id).await;
    assert!(
        matches!(result, Err(ServiceError::Vsphere(_))),
        "{result:?}"
    );
    assert_eq!(w.count("VmPowerStateObserved").await, 2);
}

#[tokio::test(start_paused = true)]
async fn sync_status_of_a_vm_without_a_vsphere_vm_is_a_typed_error() {
    let w = world(OnFailure::Destroy);
    let (_, failed) = w.failed_with_a_clone().await;
    let result = w.service.sync_status(w.t(), failed).await;
    assert!(
        matches!(
            result,
            Err(ServiceError::VmNotProvisioned {
                status: VmStatus::Failed,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn sync_status_survives_a_crash_between_any_two_steps() {
    crash_everywhere!(
        OnFailure::Destroy,
        setup
            | w
            | async move {
                let ids = w.ready().await;
                assert!(w.sim.set_power_state(&ids.2, PowerState::PoweredOff));
                ids
            },
        command | w,
        (_, vm_id, _) | async move { w.service.sync_status(w.t(), vm_id).await },
        check | w,
        (request, _, _),
        rerun,
        _finished
            | async move {
                let vm = rerun.expect("the rerun succeeds");
                assert_eq!(vm.status, VmStatus::Stopped);
                assert_eq!(w.count("VmPowerStateObserved").await, 1);
                assert_eq!(
                    w.entries_of(request, TimelineEntryType::StatusChanged)
                        .await,
                    1
                );
            }
    );
}

// ---------------------------------------------------------------------------
// The runner: cleanup after a failure, retried until it works.

fn paused_queue() -> Arc<MemoryWorkQueue> {
    Arc::new(MemoryWorkQueue::with_clock(PausedClock::new()))
}

#[tokio::test(start_paused = true)]
async fn the_runner_records_the_failure_then_retries_a_cleanup_that_failed() {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let sim = Simulator::default();
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        sim.clone(),
        timeline.clone(),
        Tenants::new().with(tenant.clone()).unwrap(),
    ));
    let queue = paused_queue();
    let runner = ProvisioningRunner::new(
        service.clone(),
        queue.clone(),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "w1".into(),
            poll_interval: Duration::from_millis(100),
            backoff: dvmm::Backoff::new(Duration::from_secs(1), Duration::from_secs(4)),
            ..RunnerConfig::default()
        },
    )
    .unwrap();
    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::ClonedThenFailed(customization_failed()),
    ));
    // The first two removals fail.
    sim.add_fault(FaultRule::times(
        Operation::DestroyVm,
        2,
        Fault::Error(VsphereError::TaskFailed {
            fault: "FileLocked".into(),
            message: "the disk is locked".into(),
        }),
    ));
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();

    let watch = async {
        let mut failure_seen_with_vm_present = false;
        loop {
            let state = service
                .request(tenant.tenant_id, request)
                .await
                .unwrap()
                .unwrap();
            if state.status == VmRequestStatus::Failed && !sim.vms().is_empty() {
                failure_seen_with_vm_present = true;
            }
            if state.status == VmRequestStatus::Failed && sim.vms().is_empty() {
                return failure_seen_with_vm_present;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (report, seen) = within("the runner to clean up", async {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let run = runner.run(async {
            let _ = done_rx.await;
        });
        let watch = async {
            let seen = watch.await;
            let _ = done_tx.send(());
            seen
        };
        tokio::join!(run, watch)
    })
    .await;
    let report = report.unwrap();
    assert!(
        seen,
        "the failure was recorded while the VM was still there (not delayed by the cleanup)"
    );
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(
        sim.call_count(Operation::DestroyVm),
        3,
        "two failed removals, then one"
    );
    let events = store.read_all(tenant.tenant_id, 0, 1000).await.unwrap();
    let count = |t: &str| events.iter().filter(|e| e.event_type == t).count();
    assert_eq!(count("VmRequestProvisioningFailed"), 1);
    assert_eq!(count("VmPartialRemoved"), 1);
    let kinds: Vec<_> = timeline
        .list(tenant.tenant_id, request)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.entry_type)
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == TimelineEntryType::PartialVmRemoved)
            .count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(queue.pending(), 0, "the job is done once the VM is removed");
}

#[tokio::test(start_paused = true)]
async fn the_runner_picks_up_a_retried_request() {
    runner_picks_up_a_retried_request(false).await;
}

#[tokio::test(start_paused = true)]
async fn the_runner_picks_up_a_request_retried_under_shared_claims() {
    runner_picks_up_a_retried_request(true).await;
}

/// With `shared`, the service takes its claims from the runner's queue
/// (the retry gives the job back to the queue); else the runner's feed
/// requeues the job when it reads the retry.
async fn runner_picks_up_a_retried_request(shared: bool) {
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let sim = Simulator::default();
    let queue = paused_queue();
    let service = ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).unwrap(),
    );
    let service = Arc::new(if shared {
        service.with_claims(queue.clone(), TokioTimer, Duration::from_secs(30))
    } else {
        service
    });
    let runner = ProvisioningRunner::new(
        service.clone(),
        queue.clone(),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "w1".into(),
            poll_interval: Duration::from_millis(100),
            ..RunnerConfig::default()
        },
    )
    .unwrap();
    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::ClonedThenFailed(customization_failed()),
    ));
    let request = service.submit(new_request(&tenant, "app01")).await.unwrap();
    service
        .approve(tenant.tenant_id, request, user())
        .await
        .unwrap();
    let status = |want: VmRequestStatus| {
        let service = service.clone();
        async move {
            loop {
                let state = service
                    .request(tenant.tenant_id, request)
                    .await
                    .unwrap()
                    .unwrap();
                if state.status == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let flow = async {
        status(VmRequestStatus::Failed).await;
        // Retried by a user while the runner keeps running.
        service
            .retry(tenant.tenant_id, request, user())
            .await
            .unwrap();
        status(VmRequestStatus::Ready).await;
    };
    within(
        "failure, retry and the runner's second attempt",
        runner.run(flow),
    )
    .await
    .unwrap();
    let vms = sim.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let state = service
        .request(tenant.tenant_id, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.attempt, 2);
    assert_eq!(vms[0].dvmm_vm_id, state.vm_id);
}
