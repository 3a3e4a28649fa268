//! Given/when/then tests of the `VmRequest` and `Vm` aggregates: every legal
//! transition, the illegal ones a host is likely to attempt, and a JSON round
//! trip of every event variant.

// The harness lives behind the `testing` feature.
#![cfg(feature = "testing")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, TimeZone, Utc};
use dvmm_core::event::StreamId;
use dvmm_core::ids::*;
use dvmm_core::spec::{IP_TIMEOUT_WARNING, NamePart, PowerState, VmResources, VmSize};
use dvmm_core::testing::AggregateTest;
use dvmm_core::vm::*;
use dvmm_core::vm_request::*;
use dvmm_core::{
    Aggregate, DomainError, DomainEvent, EventMetadata, StoredEvent, VmName, VmProvisioningResult,
};
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0xd0_0000_0000_0000_0000_0000_0000 + n)
}

fn request_id() -> VmRequestId {
    VmRequestId::from_uuid(id(1))
}
fn tenant() -> TenantId {
    TenantId::from_uuid(id(2))
}
fn project() -> ProjectId {
    ProjectId::from_uuid(id(3))
}
fn requester() -> UserId {
    UserId::from_uuid(id(4))
}
fn approver() -> UserId {
    UserId::from_uuid(id(5))
}
fn vm_id() -> VmId {
    VmId::from_uuid(id(6))
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_768_469_400 + seconds, 0)
        .single()
        .expect("valid timestamp")
}

fn m() -> VmResources {
    VmResources {
        cpu: 2,
        memory_mib: 4096,
        disk_gib: 40,
    }
}

fn ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))
}

fn submit_named(prefix: &str, name: &str) -> VmRequestCommand {
    VmRequestCommand::Submit(SubmitVmRequest {
        request_id: request_id(),
        tenant_id: tenant(),
        project_id: project(),
        project_prefix: prefix.into(),
        requested_name: name.into(),
        size: VmSize::M,
        resources: m(),
        requested_by: requester(),
        justification: "load tests".into(),
    })
}

fn created() -> VmRequestEvent {
    VmRequestEvent::VmRequestCreated(VmRequestCreated {
        request_id: request_id(),
        tenant_id: tenant(),
        project_id: project(),
        project_prefix: "web".into(),
        requested_name: "app01".into(),
        vm_name: VmName::new("web", "app01").expect("valid name"),
        size: VmSize::M,
        resources: m(),
        requested_by: requester(),
        justification: "load tests".into(),
    })
}

fn approved() -> VmRequestEvent {
    VmRequestEvent::VmRequestApproved(VmRequestApproved {
        approved_by: approver(),
    })
}

fn request_provisioning_started() -> VmRequestEvent {
    VmRequestEvent::VmRequestProvisioningStarted(VmRequestProvisioningStarted { vm_id: vm_id() })
}

fn result_with_ip() -> VmProvisioningResult {
    VmProvisioningResult {
        vmware_vm_id: VmwareVmId::new("vm-1042"),
        ip_address: Some(ip()),
        hostname: "web-app01".into(),
        warning_message: None,
    }
}

fn request_ready() -> VmRequestEvent {
    VmRequestEvent::VmRequestReady(VmRequestReady {
        vm_id: vm_id(),
        vmware_vm_id: VmwareVmId::new("vm-1042"),
        ip_address: Some(ip()),
        hostname: "web-app01".into(),
        provisioned_at: Some(at(60)),
        warning_message: None,
    })
}

fn request_failed() -> VmRequestEvent {
    VmRequestEvent::VmRequestProvisioningFailed(VmRequestProvisioningFailed {
        vm_id: vm_id(),
        error_code: "InsufficientResources".into(),
        message: "not enough memory in cluster c1".into(),
        retryable: true,
    })
}

fn rejected() -> VmRequestEvent {
    VmRequestEvent::VmRequestRejected(VmRequestRejected {
        rejected_by: approver(),
        reason: "too big".into(),
    })
}

fn cancelled() -> VmRequestEvent {
    VmRequestEvent::VmRequestCancelled(VmRequestCancelled {
        cancelled_by: requester(),
        reason: None,
    })
}

fn waiting(since: DateTime<Utc>) -> VmRequestEvent {
    VmRequestEvent::VmRequestWaitingForVcenter(VmRequestWaitingForVcenter {
        since,
        error_code: "Transport".into(),
    })
}

fn wait_for_vcenter(since: DateTime<Utc>) -> VmRequestCommand {
    VmRequestCommand::WaitForVcenter {
        since,
        error_code: "Transport".into(),
    }
}

fn mark_failed() -> VmRequestCommand {
    VmRequestCommand::MarkFailed {
        error_code: "InsufficientResources".into(),
        message: "not enough memory in cluster c1".into(),
        retryable: true,
    }
}

/// Checks an `InvalidTransition` error's action and status.
fn invalid(action: &'static str, status: &'static str) -> impl FnOnce(&DomainError) -> bool {
    move |e| {
        matches!(e, DomainError::InvalidTransition { action: a, status: s, .. }
            if *a == action && s == status)
    }
}

// ---------------------------------------------------------------------------
// VmRequest: legal transitions.

#[test]
fn submitting_creates_a_pending_request_with_the_combined_name() {
    let state = AggregateTest::<VmRequest>::given_no_events()
        .when(submit_named("web", "app01"))
        .then_expect_events(&[created()])
        .expect("a request exists");
    assert_eq!(state.status, VmRequestStatus::Pending);
    assert_eq!(state.vm_name.as_str(), "web-app01");
    assert_eq!(state.requested_by, requester());
    assert_eq!(state.decided_by, None);
}

#[test]
fn a_pending_request_can_be_approved() {
    let state = AggregateTest::<VmRequest>::given(&[created()])
        .when(VmRequestCommand::Approve { by: approver() })
        .then_expect_events(&[approved()])
        .expect("state");
    assert_eq!(state.status, VmRequestStatus::Approved);
    assert_eq!(state.decided_by, Some(approver()));
}

#[test]
fn a_pending_request_can_be_rejected_with_a_reason() {
    let state = AggregateTest::<VmRequest>::given(&[created()])
        .when(VmRequestCommand::Reject {
            by: approver(),
            reason: "too big".into(),
        })
        .then_expect_events(&[rejected()])
        .expect("state");
    assert_eq!(state.status, VmRequestStatus::Rejected);
    assert_eq!(state.reason.as_deref(), Some("too big"));
    assert_eq!(state.decided_by, Some(approver()));
}

#[test]
fn pending_and_approved_requests_can_be_cancelled() {
    for given in [vec![created()], vec![created(), approved()]] {
        let state = AggregateTest::<VmRequest>::given(&given)
            .when(VmRequestCommand::Cancel {
                by: requester(),
                reason: Some("plans changed".into()),
            })
            .then_expect_events(&[VmRequestEvent::VmRequestCancelled(VmRequestCancelled {
                cancelled_by: requester(),
                reason: Some("plans changed".into()),
            })])
            .expect("state");
        assert_eq!(state.status, VmRequestStatus::Cancelled);
        assert_eq!(state.reason.as_deref(), Some("plans changed"));
    }
}

#[test]
fn an_approved_request_starts_provisioning() {
    let state = AggregateTest::<VmRequest>::given(&[created(), approved()])
        .when(VmRequestCommand::StartProvisioning { vm_id: vm_id() })
        .then_expect_events(&[request_provisioning_started()])
        .expect("state");
    assert_eq!(state.status, VmRequestStatus::Provisioning);
    assert_eq!(state.vm_id, Some(vm_id()));
}

#[test]
fn a_provisioning_request_becomes_ready_with_the_result() {
    let state =
        AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
            .when(VmRequestCommand::MarkReady {
                result: result_with_ip(),
                at: at(60),
            })
            .then_expect_events(&[request_ready()])
            .expect("state");
    assert_eq!(state.status, VmRequestStatus::Ready);
    assert_eq!(state.result, Some(result_with_ip()));
}

#[test]
fn a_provisioning_request_becomes_ready_without_an_ip() {
    let result = VmProvisioningResult {
        ip_address: None,
        warning_message: Some(IP_TIMEOUT_WARNING.into()),
        ..result_with_ip()
    };
    let state =
        AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
            .when(VmRequestCommand::MarkReady {
                result: result.clone(),
                at: at(60),
            })
            .then_expect_events(&[VmRequestEvent::VmRequestReady(VmRequestReady {
                vm_id: vm_id(),
                vmware_vm_id: VmwareVmId::new("vm-1042"),
                ip_address: None,
                hostname: "web-app01".into(),
                provisioned_at: Some(at(60)),
                warning_message: Some(IP_TIMEOUT_WARNING.into()),
            })])
            .expect("state");
    assert_eq!(state.result, Some(result));
}

#[test]
fn a_provisioning_request_can_fail() {
    let state =
        AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
            .when(mark_failed())
            .then_expect_events(&[request_failed()])
            .expect("state");
    assert_eq!(state.status, VmRequestStatus::Failed);
    let failure = state.failure.expect("failure recorded");
    assert!(failure.retryable);
    assert_eq!(failure.error_code, "InsufficientResources");
}

#[test]
fn a_provisioning_request_waits_for_vcenter_once_per_outage() {
    let given = [created(), approved(), request_provisioning_started()];
    let state = AggregateTest::<VmRequest>::given(&given)
        .when(wait_for_vcenter(at(60)))
        .then_expect_events(&[waiting(at(60))])
        .expect("state");
    assert_eq!(
        state.status,
        VmRequestStatus::Provisioning,
        "still provisioning"
    );
    assert_eq!(state.waiting_since, Some(at(60)));
    // The same outage, seen again by a retry, writes nothing new.
    let waiting_history = [
        created(),
        approved(),
        request_provisioning_started(),
        waiting(at(60)),
    ];
    AggregateTest::<VmRequest>::given(&waiting_history)
        .when(wait_for_vcenter(at(120)))
        .then_expect_error(invalid("wait for vCenter", "Provisioning"));
    // vCenter answers: the wait ends, and the next outage is a new wait.
    let state = AggregateTest::<VmRequest>::given(&waiting_history)
        .when(VmRequestCommand::MarkVcenterReachable)
        .then_expect_events(&[VmRequestEvent::VmRequestVcenterReachable(
            VmRequestVcenterReachable {
                waiting_since: at(60),
            },
        )])
        .expect("state");
    assert_eq!(state.waiting_since, None);
    let mut second_outage = waiting_history.to_vec();
    second_outage.push(VmRequestEvent::VmRequestVcenterReachable(
        VmRequestVcenterReachable {
            waiting_since: at(60),
        },
    ));
    let state = AggregateTest::<VmRequest>::given(&second_outage)
        .when(wait_for_vcenter(at(900)))
        .then_expect_events(&[waiting(at(900))])
        .expect("state");
    assert_eq!(state.waiting_since, Some(at(900)));
}

#[test]
fn a_waiting_request_can_still_become_ready_or_fail_and_stops_waiting() {
    let given = [
        created(),
        approved(),
        request_provisioning_started(),
        waiting(at(60)),
    ];
    let state = AggregateTest::<VmRequest>::given(&given)
        .when(VmRequestCommand::MarkReady {
            result: result_with_ip(),
            at: at(60),
        })
        .then_expect_events(&[request_ready()])
        .expect("state");
    assert_eq!(
        (state.status, state.waiting_since),
        (VmRequestStatus::Ready, None)
    );
    let state = AggregateTest::<VmRequest>::given(&given)
        .when(mark_failed())
        .then_expect_events(&[request_failed()])
        .expect("state");
    assert_eq!(
        (state.status, state.waiting_since),
        (VmRequestStatus::Failed, None)
    );
}

#[test]
fn only_a_provisioning_request_waits_and_only_a_waiting_one_is_marked_reachable() {
    for (given, status) in [
        (vec![created()], "Pending"),
        (vec![created(), approved()], "Approved"),
        (
            vec![
                created(),
                approved(),
                request_provisioning_started(),
                request_ready(),
            ],
            "Ready",
        ),
    ] {
        AggregateTest::<VmRequest>::given(&given)
            .when(wait_for_vcenter(at(60)))
            .then_expect_error(invalid("wait for vCenter", status));
    }
    AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
        .when(VmRequestCommand::MarkVcenterReachable)
        .then_expect_error(invalid("mark vCenter reachable", "Provisioning"));
}

// ---------------------------------------------------------------------------
// VmRequest: illegal commands.

#[test]
fn a_rejected_request_cannot_be_approved() {
    AggregateTest::<VmRequest>::given(&[created(), rejected()])
        .when(VmRequestCommand::Approve { by: approver() })
        .then_expect_error(invalid("approve", "Rejected"));
}

#[test]
fn a_ready_request_cannot_be_marked_ready_twice() {
    AggregateTest::<VmRequest>::given(&[
        created(),
        approved(),
        request_provisioning_started(),
        request_ready(),
    ])
    .when(VmRequestCommand::MarkReady {
        result: result_with_ip(),
        at: at(60),
    })
    .then_expect_error(invalid("mark ready", "Ready"));
}

#[test]
fn a_rejection_needs_a_reason() {
    for reason in ["", "   ", "\n\t"] {
        AggregateTest::<VmRequest>::given(&[created()])
            .when(VmRequestCommand::Reject {
                by: approver(),
                reason: reason.into(),
            })
            .then_expect_error(
                |e| matches!(e, DomainError::Invalid(msg) if msg.contains("reason")),
            );
    }
}

#[test]
fn a_bad_name_is_rejected_naming_the_part() {
    let cases = [
        ("Web", "app01", NamePart::ProjectPrefix),
        ("", "app01", NamePart::ProjectPrefix),
        ("web-", "app01", NamePart::ProjectPrefix),
        ("web", "App01", NamePart::RequestedName),
        ("web", "app_01", NamePart::RequestedName),
        ("web", "", NamePart::RequestedName),
        ("web", "-app", NamePart::RequestedName),
    ];
    for (prefix, name, part) in cases {
        AggregateTest::<VmRequest>::given_no_events()
            .when(submit_named(prefix, name))
            .then_expect_error(|e| {
                matches!(e, DomainError::InvalidName(error)
                    if error.part() == part && error.to_string().starts_with(&part.to_string()))
            });
    }
    let long = "a".repeat(60);
    AggregateTest::<VmRequest>::given_no_events()
        .when(submit_named("web", &long))
        .then_expect_error(|e| {
            matches!(e, DomainError::InvalidName(error)
                if error.part() == NamePart::RequestedName && error.to_string().contains("at most 59"))
        });
}

#[test]
fn absurd_resources_are_rejected_naming_the_field() {
    let VmRequestCommand::Submit(mut submit) = submit_named("web", "app01") else {
        unreachable!()
    };
    submit.resources.cpu = 0;
    AggregateTest::<VmRequest>::given_no_events()
        .when(VmRequestCommand::Submit(submit))
        .then_expect_error(|e| matches!(e, DomainError::Invalid(msg) if msg.contains("cpu")));
}

#[test]
fn a_request_cannot_be_submitted_twice() {
    AggregateTest::<VmRequest>::given(&[created()])
        .when(submit_named("web", "app01"))
        .then_expect_error(|e| {
            matches!(
                e,
                DomainError::AlreadyExists {
                    aggregate: "VmRequest"
                }
            )
        });
}

#[test]
fn commands_on_a_missing_request_are_not_found() {
    for command in [
        VmRequestCommand::Approve { by: approver() },
        VmRequestCommand::StartProvisioning { vm_id: vm_id() },
        VmRequestCommand::MarkReady {
            result: result_with_ip(),
            at: at(60),
        },
        mark_failed(),
    ] {
        AggregateTest::<VmRequest>::given_no_events()
            .when(command)
            .then_expect_error(|e| {
                matches!(
                    e,
                    DomainError::NotFound {
                        aggregate: "VmRequest"
                    }
                )
            });
    }
}

#[test]
fn cancelling_after_provisioning_started_is_refused() {
    AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
        .when(VmRequestCommand::Cancel {
            by: requester(),
            reason: None,
        })
        .then_expect_error(invalid("cancel", "Provisioning"));
}

#[test]
fn provisioning_needs_an_approval_first() {
    AggregateTest::<VmRequest>::given(&[created()])
        .when(VmRequestCommand::StartProvisioning { vm_id: vm_id() })
        .then_expect_error(invalid("start provisioning", "Pending"));
    AggregateTest::<VmRequest>::given(&[created(), approved(), request_provisioning_started()])
        .when(VmRequestCommand::StartProvisioning { vm_id: vm_id() })
        .then_expect_error(invalid("start provisioning", "Provisioning"));
}

#[test]
fn terminal_requests_refuse_everything() {
    let histories: [(&[VmRequestEvent], &str); 4] = [
        (&[created(), rejected()], "Rejected"),
        (&[created(), cancelled()], "Cancelled"),
        (
            &[
                created(),
                approved(),
                request_provisioning_started(),
                request_ready(),
            ],
            "Ready",
        ),
        (
            &[
                created(),
                approved(),
                request_provisioning_started(),
                request_failed(),
            ],
            "Failed",
        ),
    ];
    for (given, status) in histories {
        for (command, action) in [
            (VmRequestCommand::Approve { by: approver() }, "approve"),
            (
                VmRequestCommand::Reject {
                    by: approver(),
                    reason: "late".into(),
                },
                "reject",
            ),
            (
                VmRequestCommand::Cancel {
                    by: requester(),
                    reason: None,
                },
                "cancel",
            ),
            (
                VmRequestCommand::StartProvisioning { vm_id: vm_id() },
                "start provisioning",
            ),
            (
                VmRequestCommand::MarkReady {
                    result: result_with_ip(),
                    at: at(60),
                },
                "mark ready",
            ),
            (mark_failed(), "mark failed"),
        ] {
            AggregateTest::<VmRequest>::given(given)
                .when(command)
                .then_expect_error(invalid(action, status));
        }
    }
}

#[test]
fn errors_read_well() {
    let err = VmRequest::handle(
        VmRequest::reconstitute(&[created(), rejected()]).as_ref(),
        &VmRequestCommand::Approve { by: approver() },
    )
    .expect_err("illegal");
    assert_eq!(
        err.to_string(),
        "cannot approve a VmRequest that is Rejected"
    );
}

// ---------------------------------------------------------------------------
// Vm.

fn started() -> VmProvisioningStarted {
    VmProvisioningStarted {
        vm_id: vm_id(),
        request_id: request_id(),
        tenant_id: tenant(),
        name: VmName::new("web", "app01").expect("valid"),
        resources: m(),
        folder_path: "acme/web".into(),
        placement: Some(Box::new(placement())),
    }
}

fn placement() -> dvmm_core::spec::VmPlacement {
    dvmm_core::spec::VmPlacement {
        endpoint_url: "https://vc.example.com/sdk".into(),
        datacenter: "DC0".into(),
        cluster: "DC0_C0".into(),
        resource_pool: None,
        datastore: "LocalDS_0".into(),
        network: "VM Network".into(),
        template: "ubuntu-22.04".into(),
        folder_path: "acme/web".into(),
        hostname: VmName::new("web", "app01").expect("valid"),
        ip_wait_secs: 120,
        task_secs: 1800,
        customization_secs: Some(600),
    }
}

fn vm_started() -> VmEvent {
    VmEvent::VmProvisioningStarted(started())
}

fn vm_provisioned(ip_address: Option<IpAddr>) -> VmEvent {
    VmEvent::VmProvisioned(VmProvisioned {
        vmware_vm_id: VmwareVmId::new("vm-1042"),
        ip_address,
        hostname: "web-app01".into(),
        provisioned_at: at(200),
        warning_message: ip_address.is_none().then(|| IP_TIMEOUT_WARNING.to_owned()),
    })
}

fn vm_failed() -> VmEvent {
    VmEvent::VmProvisioningFailed(VmProvisioningFailed {
        error_code: "TaskFailed".into(),
        message: "the clone task failed: template missing".into(),
        retryable: false,
    })
}

fn refreshed(ip_address: Option<IpAddr>, power_state: PowerState) -> VmEvent {
    VmEvent::VmGuestInfoRefreshed(VmGuestInfoRefreshed {
        ip_address,
        hostname: Some("web-app01".into()),
        power_state,
    })
}

fn refresh(ip_address: Option<IpAddr>, power_state: PowerState) -> VmCommand {
    VmCommand::RefreshGuestInfo {
        ip_address,
        hostname: Some("web-app01".into()),
        power_state,
    }
}

fn deleted() -> VmEvent {
    VmEvent::VmDeleted(VmDeleted {
        reason: Some("owner".into()),
    })
}

fn delete() -> VmCommand {
    VmCommand::MarkDeleted {
        reason: Some("owner".into()),
    }
}

fn record_provisioned(ip_address: Option<IpAddr>) -> VmCommand {
    VmCommand::RecordProvisioned {
        result: VmProvisioningResult {
            vmware_vm_id: VmwareVmId::new("vm-1042"),
            ip_address,
            hostname: "web-app01".into(),
            warning_message: ip_address.is_none().then(|| IP_TIMEOUT_WARNING.to_owned()),
        },
        at: at(200),
    }
}

fn record_failed() -> VmCommand {
    VmCommand::RecordFailed {
        error_code: "TaskFailed".into(),
        message: "the clone task failed: template missing".into(),
        retryable: false,
    }
}

#[test]
fn starting_creates_a_provisioning_vm() {
    let vm = AggregateTest::<Vm>::given_no_events()
        .when(VmCommand::StartProvisioning(started()))
        .then_expect_events(&[vm_started()])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Provisioning);
    assert_eq!(vm.folder_path, "acme/web");
    assert_eq!(
        vm.placement,
        Some(placement()),
        "the start records the placement"
    );
    assert_eq!(vm.vmware_vm_id, None);
}

#[test]
fn a_provisioning_vm_becomes_ready() {
    let vm = AggregateTest::<Vm>::given(&[vm_started()])
        .when(record_provisioned(Some(ip())))
        .then_expect_events(&[vm_provisioned(Some(ip()))])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Ready);
    assert_eq!(vm.ip_address, Some(ip()));
    assert_eq!(vm.hostname.as_deref(), Some("web-app01"));
    assert_eq!(vm.provisioned_at, Some(at(200)));
    assert_eq!(vm.warning_message, None);
}

#[test]
fn a_provisioning_vm_can_be_ready_without_an_ip_then_get_one() {
    let vm = AggregateTest::<Vm>::given(&[vm_started()])
        .when(record_provisioned(None))
        .then_expect_events(&[vm_provisioned(None)])
        .expect("vm");
    assert_eq!(vm.warning_message.as_deref(), Some(IP_TIMEOUT_WARNING));
    // Still no IP while powered on: the status moves to Running, the warning stays.
    let vm = AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(None)])
        .when(refresh(None, PowerState::PoweredOn))
        .then_expect_events(&[refreshed(None, PowerState::PoweredOn)])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Running);
    assert_eq!(vm.warning_message.as_deref(), Some(IP_TIMEOUT_WARNING));
    // The IP arrives: recorded, and the warning is cleared.
    let vm = AggregateTest::<Vm>::given(&[
        vm_started(),
        vm_provisioned(None),
        refreshed(None, PowerState::PoweredOn),
    ])
    .when(refresh(Some(ip()), PowerState::PoweredOn))
    .then_expect_events(&[refreshed(Some(ip()), PowerState::PoweredOn)])
    .expect("vm");
    assert_eq!(vm.ip_address, Some(ip()));
    assert_eq!(vm.warning_message, None);
}

#[test]
fn a_provisioning_vm_can_fail() {
    let vm = AggregateTest::<Vm>::given(&[vm_started()])
        .when(record_failed())
        .then_expect_events(&[vm_failed()])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Failed);
    assert!(!vm.failure.expect("failure").retryable);
}

#[test]
fn refreshing_follows_the_power_state() {
    let vm = AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(Some(ip()))])
        .when(refresh(Some(ip()), PowerState::PoweredOff))
        .then_expect_events(&[refreshed(Some(ip()), PowerState::PoweredOff)])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Stopped);
    let vm = AggregateTest::<Vm>::given(&[
        vm_started(),
        vm_provisioned(Some(ip())),
        refreshed(Some(ip()), PowerState::PoweredOff),
    ])
    .when(refresh(Some(ip()), PowerState::Suspended))
    // Suspended counts as stopped and the state keeps no power state of its
    // own, so powered off -> suspended changes nothing and records nothing.
    .then_expect_events(&[])
    .expect("vm");
    assert_eq!(vm.status, VmStatus::Stopped);
    let vm = AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(Some(ip()))])
        .when(refresh(Some(ip()), PowerState::Suspended))
        .then_expect_events(&[refreshed(Some(ip()), PowerState::Suspended)])
        .expect("vm");
    assert_eq!(vm.status, VmStatus::Stopped);
    let vm = AggregateTest::<Vm>::given(&[
        vm_started(),
        vm_provisioned(Some(ip())),
        refreshed(Some(ip()), PowerState::PoweredOff),
    ])
    .when(refresh(Some(ip()), PowerState::PoweredOn))
    .then_expect_events(&[refreshed(Some(ip()), PowerState::PoweredOn)])
    .expect("vm");
    assert_eq!(vm.status, VmStatus::Running);
}

#[test]
fn a_changed_ip_or_hostname_is_recorded() {
    let other = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7));
    let given = [
        vm_started(),
        vm_provisioned(Some(ip())),
        refreshed(Some(ip()), PowerState::PoweredOn),
    ];
    AggregateTest::<Vm>::given(&given)
        .when(refresh(Some(other), PowerState::PoweredOn))
        .then_expect_events(&[refreshed(Some(other), PowerState::PoweredOn)]);
    let vm = AggregateTest::<Vm>::given(&given)
        .when(VmCommand::RefreshGuestInfo {
            ip_address: Some(ip()),
            hostname: Some("renamed".into()),
            power_state: PowerState::PoweredOn,
        })
        .then_expect_events(&[VmEvent::VmGuestInfoRefreshed(VmGuestInfoRefreshed {
            ip_address: Some(ip()),
            hostname: Some("renamed".into()),
            power_state: PowerState::PoweredOn,
        })])
        .expect("vm");
    assert_eq!(vm.hostname.as_deref(), Some("renamed"));
}

#[test]
fn refreshing_with_no_change_records_nothing() {
    let given = [
        vm_started(),
        vm_provisioned(Some(ip())),
        refreshed(Some(ip()), PowerState::PoweredOn),
    ];
    AggregateTest::<Vm>::given(&given)
        .when(refresh(Some(ip()), PowerState::PoweredOn))
        .then_expect_events(&[]);
    // vCenter not reporting a hostname is not a change either.
    AggregateTest::<Vm>::given(&given)
        .when(VmCommand::RefreshGuestInfo {
            ip_address: Some(ip()),
            hostname: None,
            power_state: PowerState::PoweredOn,
        })
        .then_expect_events(&[]);
}

#[test]
fn refreshing_a_vm_that_is_not_live_is_refused() {
    AggregateTest::<Vm>::given(&[vm_started()])
        .when(refresh(Some(ip()), PowerState::PoweredOn))
        .then_expect_error(invalid("refresh guest info of", "Provisioning"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_failed()])
        .when(refresh(Some(ip()), PowerState::PoweredOn))
        .then_expect_error(invalid("refresh guest info of", "Failed"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(Some(ip())), deleted()])
        .when(refresh(Some(ip()), PowerState::PoweredOn))
        .then_expect_error(invalid("refresh guest info of", "Deleted"));
    AggregateTest::<Vm>::given_no_events()
        .when(refresh(Some(ip()), PowerState::PoweredOn))
        .then_expect_error(|e| matches!(e, DomainError::NotFound { aggregate: "Vm" }));
}

#[test]
fn ready_live_and_failed_vms_can_be_deleted() {
    let histories: [&[VmEvent]; 4] = [
        &[vm_started(), vm_provisioned(Some(ip()))],
        &[
            vm_started(),
            vm_provisioned(Some(ip())),
            refreshed(Some(ip()), PowerState::PoweredOn),
        ],
        &[
            vm_started(),
            vm_provisioned(Some(ip())),
            refreshed(Some(ip()), PowerState::PoweredOff),
        ],
        &[vm_started(), vm_failed()],
    ];
    for given in histories {
        let vm = AggregateTest::<Vm>::given(given)
            .when(delete())
            .then_expect_events(&[deleted()])
            .expect("vm");
        assert_eq!(vm.status, VmStatus::Deleted);
    }
}

#[test]
fn illegal_vm_commands_are_refused() {
    AggregateTest::<Vm>::given(&[vm_started()])
        .when(VmCommand::StartProvisioning(started()))
        .then_expect_error(|e| matches!(e, DomainError::AlreadyExists { aggregate: "Vm" }));
    AggregateTest::<Vm>::given(&[vm_started()])
        .when(delete())
        .then_expect_error(invalid("delete", "Provisioning"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(Some(ip()))])
        .when(record_provisioned(Some(ip())))
        .then_expect_error(invalid("record provisioned", "Ready"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_provisioned(Some(ip()))])
        .when(record_failed())
        .then_expect_error(invalid("record failure of", "Ready"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_failed()])
        .when(record_provisioned(Some(ip())))
        .then_expect_error(invalid("record provisioned", "Failed"));
    AggregateTest::<Vm>::given(&[vm_started(), vm_failed(), deleted()])
        .when(delete())
        .then_expect_error(invalid("delete", "Deleted"));
    for command in [record_provisioned(None), record_failed(), delete()] {
        AggregateTest::<Vm>::given_no_events()
            .when(command)
            .then_expect_error(|e| matches!(e, DomainError::NotFound { aggregate: "Vm" }));
    }
}

// ---------------------------------------------------------------------------
// JSON round trip of every event variant, through the store envelope.

fn metadata(n: u128) -> EventMetadata {
    EventMetadata {
        event_id: EventId::from_uuid(id(100 + n)),
        tenant_id: tenant(),
        user_id: approver(),
        correlation_id: CorrelationId::from_uuid(id(99)),
        causation_id: (n > 0).then(|| EventId::from_uuid(id(100 + n - 1))),
        occurred_at: Utc
            .timestamp_opt(1_768_469_400 + n as i64, 123_456_789)
            .single()
            .expect("timestamp"),
    }
}

/// Serializes through a JSON string (as a store would), wraps in the stored
/// envelope, and decodes.
fn round_trip<E: DomainEvent + std::fmt::Debug + PartialEq>(stream_type: &str, events: &[E]) {
    for (i, event) in events.iter().enumerate() {
        let new_event = event.to_new_event(metadata(i as u128));
        let text = serde_json::to_string(&new_event).expect("serializes");
        let new_event: dvmm_core::NewEvent = serde_json::from_str(&text).expect("parses");
        let stored = StoredEvent {
            position: 1000 + i as u64,
            stream_id: StreamId::new(stream_type, id(1)),
            version: i as u64 + 1,
            event_type: new_event.event_type,
            schema_version: new_event.schema_version,
            payload: new_event.payload,
            metadata: new_event.metadata,
        };
        let text = serde_json::to_string(&stored).expect("envelope serializes");
        let stored: StoredEvent = serde_json::from_str(&text).expect("envelope parses");
        assert_eq!(stored.metadata, metadata(i as u128), "metadata round trip");
        let decoded = E::decode(&stored).expect("decodes");
        assert_eq!(&decoded, event, "{} round trip", event.event_type());
    }
}

#[test]
fn every_request_event_round_trips_through_json() {
    let events = vec![
        created(),
        VmRequestEvent::VmRequestCreated(VmRequestCreated {
            justification: "unicode: Prüfstand für Lasttests ✓ \"quoted\"\n".into(),
            size: VmSize::XL,
            resources: VmResources {
                cpu: 256,
                memory_mib: 24 * 1024 * 1024,
                disk_gib: 62 * 1024,
            },
            ..match created() {
                VmRequestEvent::VmRequestCreated(c) => c,
                _ => unreachable!(),
            }
        }),
        approved(),
        rejected(),
        cancelled(),
        VmRequestEvent::VmRequestCancelled(VmRequestCancelled {
            cancelled_by: requester(),
            reason: Some(String::new()),
        }),
        request_provisioning_started(),
        request_ready(),
        VmRequestEvent::VmRequestReady(VmRequestReady {
            vm_id: vm_id(),
            vmware_vm_id: VmwareVmId::new("vm-9"),
            ip_address: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            hostname: "web-app01".into(),
            provisioned_at: None,
            warning_message: Some(IP_TIMEOUT_WARNING.into()),
        }),
        request_failed(),
        waiting(at(60)),
        VmRequestEvent::VmRequestVcenterReachable(VmRequestVcenterReachable {
            waiting_since: at(60),
        }),
        VmRequestEvent::VmRequestRetried(dvmm_core::vm_request::VmRequestRetried {
            retried_by: requester(),
            failed_vm_id: vm_id(),
            attempt: 2,
        }),
        VmRequestEvent::VmRequestCustomizingGuest(
            dvmm_core::vm_request::VmRequestCustomizingGuest { vm_id: vm_id() },
        ),
    ];
    // Every variant is covered (the match has no wildcard).
    let mut seen = [false; 11];
    for e in &events {
        seen[match e {
            VmRequestEvent::VmRequestCreated(_) => 0,
            VmRequestEvent::VmRequestApproved(_) => 1,
            VmRequestEvent::VmRequestRejected(_) => 2,
            VmRequestEvent::VmRequestCancelled(_) => 3,
            VmRequestEvent::VmRequestProvisioningStarted(_) => 4,
            VmRequestEvent::VmRequestReady(_) => 5,
            VmRequestEvent::VmRequestProvisioningFailed(_) => 6,
            VmRequestEvent::VmRequestWaitingForVcenter(_) => 7,
            VmRequestEvent::VmRequestVcenterReachable(_) => 8,
            VmRequestEvent::VmRequestRetried(_) => 9,
            VmRequestEvent::VmRequestCustomizingGuest(_) => 10,
        }] = true;
    }
    assert!(
        seen.iter().all(|s| *s),
        "every request event variant: {seen:?}"
    );
    round_trip(VmRequest::STREAM_TYPE, &events);
}

#[test]
fn every_vm_event_round_trips_through_json() {
    let events = vec![
        vm_started(),
        vm_provisioned(Some(ip())),
        vm_provisioned(None),
        VmEvent::VmProvisioned(VmProvisioned {
            vmware_vm_id: VmwareVmId::new("vm-1"),
            ip_address: Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
            hostname: "web-app01".into(),
            provisioned_at: Utc
                .timestamp_opt(1_768_469_400, 999_999_999)
                .single()
                .expect("timestamp"),
            warning_message: None,
        }),
        vm_failed(),
        refreshed(Some(ip()), PowerState::PoweredOn),
        refreshed(None, PowerState::PoweredOff),
        VmEvent::VmGuestInfoRefreshed(VmGuestInfoRefreshed {
            ip_address: None,
            hostname: None,
            power_state: PowerState::Suspended,
        }),
        deleted(),
        VmEvent::VmDeleted(VmDeleted { reason: None }),
        VmEvent::VmPartialRemoved(dvmm_core::vm::VmPartialRemoved {
            vmware_vm_id: Some(VmwareVmId::new("vm-1")),
        }),
        VmEvent::VmPartialRemoved(dvmm_core::vm::VmPartialRemoved { vmware_vm_id: None }),
        VmEvent::VmPowerStateObserved(dvmm_core::vm::VmPowerStateObserved {
            power_state: PowerState::Suspended,
        }),
    ];
    let mut seen = [false; 7];
    for e in &events {
        seen[match e {
            VmEvent::VmProvisioningStarted(_) => 0,
            VmEvent::VmProvisioned(_) => 1,
            VmEvent::VmProvisioningFailed(_) => 2,
            VmEvent::VmGuestInfoRefreshed(_) => 3,
            VmEvent::VmDeleted(_) => 4,
            VmEvent::VmPartialRemoved(_) => 5,
            VmEvent::VmPowerStateObserved(_) => 6,
        }] = true;
    }
    assert!(seen.iter().all(|s| *s), "every VM event variant: {seen:?}");
    round_trip(Vm::STREAM_TYPE, &events);
}
