//! Property tests of the domain core:
//! (a) the events a command sequence emits, serialized to JSON and decoded
//!     back, replay to the state an independent model of the lifecycle
//!     (written here, not the aggregates' code) reaches on the same commands,
//!     and are the events that model expects;
//! (b) no command sequence panics, rejected commands emit nothing, accepted
//!     ones emit only legal transitions (checked against a transition table
//!     written here, independently of the aggregates);
//! (c) `VmName` accepts exactly the RFC 1123 labels and blames the right part.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, TimeZone, Utc};
use dvmm_core::event::StreamId;
use dvmm_core::ids::*;
use dvmm_core::spec::{NameError, NamePart, PowerState, VmResources, VmSize};
use dvmm_core::vm::*;
use dvmm_core::vm_request::*;
use dvmm_core::{Aggregate, DomainEvent, EventMetadata, StoredEvent, VmName, VmProvisioningResult};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Generators. Values come from small pools so that sequences hit equal and
// different values often (e.g. a refresh that changes nothing).

fn user() -> impl Strategy<Value = UserId> {
    (0u128..3).prop_map(|n| UserId::from_uuid(Uuid::from_u128(0x5000 + n)))
}

fn vm_id() -> impl Strategy<Value = VmId> {
    (0u128..3).prop_map(|n| VmId::from_uuid(Uuid::from_u128(0x6000 + n)))
}

fn ip() -> impl Strategy<Value = Option<IpAddr>> {
    prop_oneof![
        Just(None),
        Just(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)))),
        Just(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 101)))),
        Just(Some(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)))),
        any::<[u8; 4]>().prop_map(|o| Some(IpAddr::from(o))),
        any::<[u16; 8]>().prop_map(|s| Some(IpAddr::from(s))),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("   ".to_owned()),
        Just("not enough memory".to_owned()),
        "\\PC{0,20}",
    ]
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970..2200, with nanoseconds: what a Clock can hand out.
    (0i64..7_258_118_400, 0u32..1_000_000_000).prop_map(|(s, ns)| {
        Utc.timestamp_opt(s, ns)
            .single()
            .expect("in-range timestamp")
    })
}

fn resources() -> impl Strategy<Value = VmResources> {
    prop_oneof![
        4 => (1u32..=8, prop::sample::select(vec![2048u64, 4096, 8192]), 1u64..200)
            .prop_map(|(cpu, memory_mib, disk_gib)| VmResources { cpu, memory_mib, disk_gib }),
        1 => (any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(cpu, memory_mib, disk_gib)| VmResources { cpu, memory_mib, disk_gib }),
        1 => (0u32..=300, 0u64..=1024, 0u64..=70_000)
            .prop_map(|(cpu, memory_mib, disk_gib)| VmResources { cpu, memory_mib, disk_gib }),
    ]
}

fn size() -> impl Strategy<Value = VmSize> {
    prop::sample::select(VmSize::ALL.to_vec())
}

/// Name parts: mostly valid, sometimes broken in the usual ways.
fn name_part() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        1 => "[a-zA-Z0-9_.-]{0,6}",
        1 => "[a-z]{55,64}",
        1 => "\\PC{0,4}",
    ]
}

/// A justification or reason: mostly short, sometimes at or just over the
/// 4,000-character bound (multi-byte at the bound: it counts characters).
fn free_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => text(),
        1 => Just("é".repeat(MAX_FREE_TEXT)),
        1 => Just("x".repeat(MAX_FREE_TEXT + 1)),
    ]
}

fn submit() -> impl Strategy<Value = VmRequestCommand> {
    (
        name_part(),
        name_part(),
        size(),
        resources(),
        user(),
        free_text(),
        0u128..3,
    )
        .prop_map(
            |(project_prefix, requested_name, size, resources, requested_by, justification, n)| {
                VmRequestCommand::Submit(SubmitVmRequest {
                    request_id: VmRequestId::from_uuid(Uuid::from_u128(0x1000 + n)),
                    tenant_id: TenantId::from_uuid(Uuid::from_u128(0x2000 + n)),
                    project_id: ProjectId::from_uuid(Uuid::from_u128(0x3000 + n)),
                    project_prefix,
                    requested_name,
                    size,
                    resources,
                    requested_by,
                    justification,
                })
            },
        )
}

fn provisioning_result() -> impl Strategy<Value = VmProvisioningResult> {
    (
        "vm-[0-9]{1,5}",
        ip(),
        prop_oneof![Just("web-app01".to_owned()), "\\PC{0,10}"],
        prop::option::of(text()),
    )
        .prop_map(
            |(id, ip_address, hostname, warning_message)| VmProvisioningResult {
                vmware_vm_id: VmwareVmId::new(id),
                ip_address,
                hostname,
                warning_message,
            },
        )
}

fn request_command() -> impl Strategy<Value = VmRequestCommand> {
    prop_oneof![
        2 => submit(),
        3 => user().prop_map(|by| VmRequestCommand::Approve { by }),
        2 => (user(), free_text()).prop_map(|(by, reason)| VmRequestCommand::Reject { by, reason }),
        1 => (user(), prop::option::of(free_text()))
            .prop_map(|(by, reason)| VmRequestCommand::Cancel { by, reason }),
        3 => vm_id().prop_map(|vm_id| VmRequestCommand::StartProvisioning { vm_id }),
        3 => (provisioning_result(), timestamp())
            .prop_map(|(result, at)| VmRequestCommand::MarkReady { result, at }),
        2 => (text(), text(), any::<bool>()).prop_map(|(error_code, message, retryable)| {
            VmRequestCommand::MarkFailed { error_code, message, retryable }
        }),
        2 => user().prop_map(|by| VmRequestCommand::Retry { by }),
    ]
}

fn hostname() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("web-app01".to_owned())),
        Just(Some("renamed".to_owned())),
        "\\PC{0,8}".prop_map(Some),
    ]
}

fn power_state() -> impl Strategy<Value = PowerState> {
    prop::sample::select(vec![
        PowerState::PoweredOn,
        PowerState::PoweredOff,
        PowerState::Suspended,
    ])
}

fn vm_started_command() -> impl Strategy<Value = VmCommand> {
    (
        vm_id(),
        0u128..3,
        "[a-z]{1,5}",
        "[a-z0-9]{1,5}",
        resources(),
        "\\PC{0,12}",
    )
        .prop_map(|(vm_id, n, prefix, name, resources, folder_path)| {
            VmCommand::StartProvisioning(VmProvisioningStarted {
                vm_id,
                request_id: VmRequestId::from_uuid(Uuid::from_u128(0x1000 + n)),
                tenant_id: TenantId::from_uuid(Uuid::from_u128(0x2000 + n)),
                name: VmName::new(&prefix, &name).expect("generated from valid parts"),
                resources,
                folder_path,
                placement: None,
            })
        })
}

fn vm_command() -> impl Strategy<Value = VmCommand> {
    prop_oneof![
        1 => vm_started_command(),
        3 => (provisioning_result(), timestamp())
            .prop_map(|(result, at)| VmCommand::RecordProvisioned { result, at }),
        2 => (text(), text(), any::<bool>()).prop_map(|(error_code, message, retryable)| {
            VmCommand::RecordFailed { error_code, message, retryable }
        }),
        6 => (ip(), hostname(), power_state()).prop_map(|(ip_address, hostname, power_state)| {
            VmCommand::RefreshGuestInfo { ip_address, hostname, power_state }
        }),
        1 => prop::option::of(text()).prop_map(|reason| VmCommand::MarkDeleted { reason }),
        1 => prop::option::of("vm-[0-9]{1,4}".prop_map(VmwareVmId::new))
            .prop_map(|vmware_vm_id| VmCommand::RecordPartialRemoved { vmware_vm_id }),
        3 => power_state().prop_map(|power_state| VmCommand::ObservePowerState { power_state }),
    ]
}

// ---------------------------------------------------------------------------
// Independent references.

/// RFC 1123 label as the spec states it: 1–63 characters from lowercase
/// `a-z`, `0-9`, `-`, not starting or ending with `-`.
fn is_label(s: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let n = s.chars().count();
    (1..=63).contains(&n) && s.chars().all(allowed) && !s.starts_with('-') && !s.ends_with('-')
}

/// Sizes a request may carry: positive, at most 256 vCPUs, 256 MiB..24 TiB of
/// memory in 4 MiB steps, 1 GiB..62 TiB of disk.
fn resources_ok(r: &VmResources) -> bool {
    (1..=256).contains(&r.cpu)
        && (256..=24 * 1024 * 1024).contains(&r.memory_mib)
        && r.memory_mib.is_multiple_of(4)
        && (1..=62 * 1024).contains(&r.disk_gib)
}

/// Justifications and reasons are shown to people and copied into every
/// event and timeline entry: at most this many characters.
const MAX_FREE_TEXT: usize = 4000;

fn fits(text: &str) -> bool {
    text.chars().count() <= MAX_FREE_TEXT
}

/// What a request command may do from a status: the status it leads to, or
/// `None` when it must be refused.
fn request_transition(
    from: Option<VmRequestStatus>,
    command: &VmRequestCommand,
) -> Option<VmRequestStatus> {
    use VmRequestCommand as C;
    use VmRequestStatus as S;
    match (from, command) {
        (None, C::Submit(s)) => (is_label(&s.project_prefix)
            && is_label(&s.requested_name)
            && s.project_prefix.len() + 1 + s.requested_name.len() <= 63
            && resources_ok(&s.resources)
            && fits(&s.justification))
        .then_some(S::Pending),
        (Some(S::Pending), C::Approve { .. }) => Some(S::Approved),
        (Some(S::Pending), C::Reject { reason, .. }) => {
            (!reason.trim().is_empty() && fits(reason)).then_some(S::Rejected)
        }
        (Some(S::Pending | S::Approved), C::Cancel { reason, .. }) => {
            reason.as_deref().is_none_or(fits).then_some(S::Cancelled)
        }
        (Some(S::Approved), C::StartProvisioning { .. }) => Some(S::Provisioning),
        (Some(S::Provisioning), C::MarkReady { .. }) => Some(S::Ready),
        (Some(S::Provisioning), C::MarkFailed { .. }) => Some(S::Failed),
        (Some(S::Failed), C::Retry { .. }) => Some(S::Approved),
        _ => None,
    }
}

/// Which event may move a request from one status to another.
fn request_event_legal(
    from: Option<VmRequestStatus>,
    event: &VmRequestEvent,
    to: VmRequestStatus,
) -> bool {
    use VmRequestEvent as E;
    use VmRequestStatus as S;
    matches!(
        (from, event, to),
        (None, E::VmRequestCreated(_), S::Pending)
            | (Some(S::Pending), E::VmRequestApproved(_), S::Approved)
            | (Some(S::Pending), E::VmRequestRejected(_), S::Rejected)
            | (
                Some(S::Pending | S::Approved),
                E::VmRequestCancelled(_),
                S::Cancelled
            )
            | (
                Some(S::Approved),
                E::VmRequestProvisioningStarted(_),
                S::Provisioning
            )
            | (Some(S::Provisioning), E::VmRequestReady(_), S::Ready)
            | (
                Some(S::Provisioning),
                E::VmRequestProvisioningFailed(_),
                S::Failed
            )
            | (Some(S::Failed), E::VmRequestRetried(_), S::Approved)
    )
}

/// What a VM command may do: `Some(Some(status))` to move, `Some(None)` when
/// it is accepted but changes nothing, `None` when it must be refused.
fn vm_transition(from: Option<&Vm>, command: &VmCommand) -> Option<Option<VmStatus>> {
    use VmCommand as C;
    use VmStatus as S;
    let live = |p: PowerState| match p {
        PowerState::PoweredOn => S::Running,
        PowerState::PoweredOff | PowerState::Suspended => S::Stopped,
    };
    match (from.map(|vm| vm.status), command) {
        (None, C::StartProvisioning(_)) => Some(Some(S::Provisioning)),
        (Some(S::Provisioning), C::RecordProvisioned { .. }) => Some(Some(S::Ready)),
        (Some(S::Provisioning), C::RecordFailed { .. }) => Some(Some(S::Failed)),
        (
            Some(S::Ready | S::Running | S::Stopped),
            C::RefreshGuestInfo {
                ip_address,
                hostname,
                power_state,
            },
        ) => {
            let vm = from.expect("status came from a VM");
            let same = vm.status == live(*power_state)
                && vm.ip_address == *ip_address
                && hostname
                    .as_ref()
                    .is_none_or(|h| vm.hostname.as_ref() == Some(h));
            Some((!same).then(|| live(*power_state)))
        }
        (Some(S::Ready | S::Running | S::Stopped | S::Failed), C::MarkDeleted { reason }) => reason
            .as_deref()
            .is_none_or(fits)
            .then_some(Some(S::Deleted)),
        (Some(S::Failed), C::RecordPartialRemoved { .. }) => {
            let vm = from.expect("status came from a VM");
            vm.partial_removed.is_none().then_some(Some(S::Failed))
        }
        (
            Some(status @ (S::Ready | S::Running | S::Stopped)),
            C::ObservePowerState { power_state },
        ) => Some((status != live(*power_state)).then(|| live(*power_state))),
        _ => None,
    }
}

fn vm_event_legal(from: Option<VmStatus>, event: &VmEvent, to: VmStatus) -> bool {
    use VmEvent as E;
    use VmStatus as S;
    matches!(
        (from, event, to),
        (None, E::VmProvisioningStarted(_), S::Provisioning)
            | (Some(S::Provisioning), E::VmProvisioned(_), S::Ready)
            | (Some(S::Provisioning), E::VmProvisioningFailed(_), S::Failed)
            | (
                Some(S::Ready | S::Running | S::Stopped),
                E::VmGuestInfoRefreshed(_),
                S::Running | S::Stopped
            )
            | (
                Some(S::Ready | S::Running | S::Stopped | S::Failed),
                E::VmDeleted(_),
                S::Deleted
            )
            | (Some(S::Failed), E::VmPartialRemoved(_), S::Failed)
            | (
                Some(S::Ready | S::Running | S::Stopped),
                E::VmPowerStateObserved(_),
                S::Running | S::Stopped
            )
    )
}

// ---------------------------------------------------------------------------
// Independent models of the lifecycles, for (a): they follow the commands
// with their own state, so a wrong `apply`, a wrong `handle` or a lossy
// encoding each make the replayed state differ from theirs.

/// What the spec says a request is after a sequence of commands.
#[derive(Debug, Default)]
struct RequestModel {
    status: Option<VmRequestStatus>,
    submitted: Option<SubmitVmRequest>,
    decided_by: Option<UserId>,
    reason: Option<String>,
    vm_id: Option<VmId>,
    result: Option<VmProvisioningResult>,
    provisioned_at: Option<DateTime<Utc>>,
    /// Error code, message, retryable.
    failure: Option<(String, String, bool)>,
    /// Retries so far.
    retries: u32,
    failed_vm_ids: Vec<VmId>,
}

impl RequestModel {
    /// Follows one command; returns the type of the event it must emit, or
    /// `None` when it must be refused.
    fn step(&mut self, command: &VmRequestCommand) -> Option<&'static str> {
        use VmRequestCommand as C;
        use VmRequestStatus as S;
        let (to, event) = match (self.status, command) {
            (None, C::Submit(s))
                if is_label(&s.project_prefix)
                    && is_label(&s.requested_name)
                    && s.project_prefix.len() + 1 + s.requested_name.len() <= 63
                    && resources_ok(&s.resources)
                    && fits(&s.justification) =>
            {
                self.submitted = Some(s.clone());
                (S::Pending, "VmRequestCreated")
            }
            (Some(S::Pending), C::Approve { by }) => {
                self.decided_by = Some(*by);
                (S::Approved, "VmRequestApproved")
            }
            (Some(S::Pending), C::Reject { by, reason })
                if !reason.trim().is_empty() && fits(reason) =>
            {
                self.decided_by = Some(*by);
                self.reason = Some(reason.clone());
                (S::Rejected, "VmRequestRejected")
            }
            (Some(S::Pending | S::Approved), C::Cancel { reason, .. })
                if reason.as_deref().is_none_or(fits) =>
            {
                self.reason = reason.clone();
                (S::Cancelled, "VmRequestCancelled")
            }
            (Some(S::Approved), C::StartProvisioning { vm_id }) => {
                self.vm_id = Some(*vm_id);
                (S::Provisioning, "VmRequestProvisioningStarted")
            }
            (Some(S::Provisioning), C::MarkReady { result, at }) => {
                self.result = Some(result.clone());
                self.provisioned_at = Some(*at);
                (S::Ready, "VmRequestReady")
            }
            (Some(S::Failed), C::Retry { .. }) => {
                // A new attempt: the failed VM is history, the next start
                // brings a new one.
                self.retries += 1;
                self.failed_vm_ids.extend(self.vm_id.take());
                self.failure = None;
                (S::Approved, "VmRequestRetried")
            }
            (
                Some(S::Provisioning),
                C::MarkFailed {
                    error_code,
                    message,
                    retryable,
                },
            ) => {
                self.failure = Some((error_code.clone(), message.clone(), *retryable));
                (S::Failed, "VmRequestProvisioningFailed")
            }
            _ => return None,
        };
        self.status = Some(to);
        Some(event)
    }

    /// The replayed request is the one this model describes.
    fn check(&self, replayed: Option<&VmRequest>) -> Result<(), TestCaseError> {
        let (Some(status), Some(submitted)) = (self.status, &self.submitted) else {
            prop_assert!(
                replayed.is_none(),
                "no request was submitted, yet {replayed:?}"
            );
            return Ok(());
        };
        let Some(r) = replayed else {
            return Err(TestCaseError::fail(format!(
                "the model is {status:?}, the replay has no request"
            )));
        };
        prop_assert_eq!(r.status, status);
        prop_assert_eq!(r.id, submitted.request_id);
        prop_assert_eq!(r.tenant_id, submitted.tenant_id);
        prop_assert_eq!(r.project_id, submitted.project_id);
        prop_assert_eq!(&r.project_prefix, &submitted.project_prefix);
        prop_assert_eq!(&r.requested_name, &submitted.requested_name);
        prop_assert_eq!(
            r.vm_name.as_str(),
            format!("{}-{}", submitted.project_prefix, submitted.requested_name)
        );
        prop_assert_eq!(r.size, submitted.size);
        prop_assert_eq!(r.resources, submitted.resources);
        prop_assert_eq!(r.requested_by, submitted.requested_by);
        prop_assert_eq!(&r.justification, &submitted.justification);
        prop_assert_eq!(r.decided_by, self.decided_by);
        prop_assert_eq!(&r.reason, &self.reason);
        prop_assert_eq!(r.vm_id, self.vm_id);
        prop_assert_eq!(&r.result, &self.result);
        prop_assert_eq!(r.provisioned_at, self.provisioned_at);
        prop_assert_eq!(r.attempt, 1 + self.retries);
        prop_assert_eq!(&r.failed_vm_ids, &self.failed_vm_ids);
        let failure = r.failure.as_ref().map(|f| {
            prop_assert_eq!(Some(f.vm_id), self.vm_id);
            Ok((f.error_code.clone(), f.message.clone(), f.retryable))
        });
        let failure = failure.transpose()?;
        prop_assert_eq!(&failure, &self.failure);
        Ok(())
    }
}

/// What the spec says a VM is after a sequence of commands.
#[derive(Debug, Default)]
struct VmModel {
    status: Option<VmStatus>,
    started: Option<VmProvisioningStarted>,
    vmware_vm_id: Option<VmwareVmId>,
    ip_address: Option<IpAddr>,
    hostname: Option<String>,
    provisioned_at: Option<DateTime<Utc>>,
    warning_message: Option<String>,
    /// Error code, message, retryable.
    failure: Option<(String, String, bool)>,
    partial_removed: Option<Option<VmwareVmId>>,
    deleted_reason: Option<String>,
}

impl VmModel {
    /// Follows one command; returns the type of the event it must emit, or
    /// `None` when it must be refused or changes nothing.
    fn step(&mut self, command: &VmCommand) -> Option<&'static str> {
        use VmCommand as C;
        use VmStatus as S;
        let (to, event) = match (self.status, command) {
            (None, C::StartProvisioning(started)) => {
                self.started = Some(started.clone());
                (S::Provisioning, "VmProvisioningStarted")
            }
            (Some(S::Provisioning), C::RecordProvisioned { result, at }) => {
                self.vmware_vm_id = Some(result.vmware_vm_id.clone());
                self.ip_address = result.ip_address;
                self.hostname = Some(result.hostname.clone());
                self.provisioned_at = Some(*at);
                self.warning_message = result.warning_message.clone();
                (S::Ready, "VmProvisioned")
            }
            (
                Some(S::Provisioning),
                C::RecordFailed {
                    error_code,
                    message,
                    retryable,
                },
            ) => {
                self.failure = Some((error_code.clone(), message.clone(), *retryable));
                (S::Failed, "VmProvisioningFailed")
            }
            (
                Some(from @ (S::Ready | S::Running | S::Stopped)),
                C::RefreshGuestInfo {
                    ip_address,
                    hostname,
                    power_state,
                },
            ) => {
                let to = match power_state {
                    PowerState::PoweredOn => S::Running,
                    PowerState::PoweredOff | PowerState::Suspended => S::Stopped,
                };
                let unchanged = from == to
                    && self.ip_address == *ip_address
                    && hostname
                        .as_ref()
                        .is_none_or(|h| self.hostname.as_ref() == Some(h));
                if unchanged {
                    return None;
                }
                self.ip_address = *ip_address;
                if let Some(h) = hostname {
                    self.hostname = Some(h.clone());
                }
                // An address found later answers the "IP pending" warning.
                if ip_address.is_some() {
                    self.warning_message = None;
                }
                (to, "VmGuestInfoRefreshed")
            }
            (Some(S::Ready | S::Running | S::Stopped | S::Failed), C::MarkDeleted { reason })
                if reason.as_deref().is_none_or(fits) =>
            {
                self.deleted_reason = reason.clone();
                (S::Deleted, "VmDeleted")
            }
            (Some(S::Failed), C::RecordPartialRemoved { vmware_vm_id })
                if self.partial_removed.is_none() =>
            {
                self.partial_removed = Some(vmware_vm_id.clone());
                (S::Failed, "VmPartialRemoved")
            }
            (
                Some(from @ (S::Ready | S::Running | S::Stopped)),
                C::ObservePowerState { power_state },
            ) => {
                let to = match power_state {
                    PowerState::PoweredOn => S::Running,
                    PowerState::PoweredOff | PowerState::Suspended => S::Stopped,
                };
                if to == from {
                    return None;
                }
                (to, "VmPowerStateObserved")
            }
            _ => return None,
        };
        self.status = Some(to);
        Some(event)
    }

    /// The replayed VM is the one this model describes.
    fn check(&self, replayed: Option<&Vm>) -> Result<(), TestCaseError> {
        let (Some(status), Some(started)) = (self.status, &self.started) else {
            prop_assert!(replayed.is_none(), "no VM was started, yet {replayed:?}");
            return Ok(());
        };
        let Some(vm) = replayed else {
            return Err(TestCaseError::fail(format!(
                "the model is {status:?}, the replay has no VM"
            )));
        };
        prop_assert_eq!(vm.status, status);
        prop_assert_eq!(vm.id, started.vm_id);
        prop_assert_eq!(vm.request_id, started.request_id);
        prop_assert_eq!(vm.tenant_id, started.tenant_id);
        prop_assert_eq!(&vm.name, &started.name);
        prop_assert_eq!(vm.resources, started.resources);
        prop_assert_eq!(&vm.folder_path, &started.folder_path);
        prop_assert_eq!(&vm.vmware_vm_id, &self.vmware_vm_id);
        prop_assert_eq!(vm.ip_address, self.ip_address);
        prop_assert_eq!(&vm.hostname, &self.hostname);
        prop_assert_eq!(vm.provisioned_at, self.provisioned_at);
        prop_assert_eq!(&vm.warning_message, &self.warning_message);
        let failure = vm
            .failure
            .as_ref()
            .map(|f| (f.error_code.clone(), f.message.clone(), f.retryable));
        prop_assert_eq!(&failure, &self.failure);
        prop_assert_eq!(&vm.partial_removed, &self.partial_removed);
        prop_assert_eq!(&vm.deleted_reason, &self.deleted_reason);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Running command sequences.

/// Applies each command to the running state, checking (b) on the way, and
/// returns the final state and every emitted event.
fn run_requests(
    commands: &[VmRequestCommand],
) -> Result<(Option<VmRequest>, Vec<VmRequestEvent>), TestCaseError> {
    let mut state: Option<VmRequest> = None;
    let mut all = Vec::new();
    for command in commands {
        let before = state.as_ref().map(|s| s.status);
        let expected = request_transition(before, command);
        match (VmRequest::handle(state.as_ref(), command), expected) {
            (Err(_), None) => {}
            (Err(e), Some(to)) => {
                return Err(TestCaseError::fail(format!(
                    "{command:?} from {before:?} should lead to {to:?}, was refused: {e}"
                )));
            }
            (Ok(events), None) => {
                return Err(TestCaseError::fail(format!(
                    "{command:?} from {before:?} should be refused, emitted {events:?}"
                )));
            }
            (Ok(events), Some(to)) => {
                prop_assert_eq!(events.len(), 1, "one event per accepted request command");
                for event in events {
                    let from = state.as_ref().map(|s| s.status);
                    state = VmRequest::apply(state, &event);
                    let after = state.as_ref().map(|s| s.status);
                    prop_assert!(
                        after.is_some_and(|a| request_event_legal(from, &event, a)),
                        "illegal transition {:?} --{:?}--> {:?}",
                        from,
                        event,
                        after
                    );
                    all.push(event);
                }
                prop_assert_eq!(state.as_ref().map(|s| s.status), Some(to));
                check_request_data(state.as_ref().expect("exists"), command)?;
            }
        }
    }
    Ok((state, all))
}

/// The state carries what the accepted command said.
fn check_request_data(state: &VmRequest, command: &VmRequestCommand) -> Result<(), TestCaseError> {
    use VmRequestCommand as C;
    match command {
        C::Submit(s) => {
            prop_assert_eq!(state.id, s.request_id);
            prop_assert_eq!(state.tenant_id, s.tenant_id);
            prop_assert_eq!(state.project_id, s.project_id);
            prop_assert_eq!(
                state.vm_name.as_str(),
                format!("{}-{}", s.project_prefix, s.requested_name)
            );
            prop_assert_eq!(state.size, s.size);
            prop_assert_eq!(state.resources, s.resources);
            prop_assert_eq!(&state.justification, &s.justification);
            prop_assert_eq!(state.requested_by, s.requested_by);
        }
        C::Approve { by } => prop_assert_eq!(state.decided_by, Some(*by)),
        C::Reject { by, reason } => {
            prop_assert_eq!(state.decided_by, Some(*by));
            prop_assert_eq!(state.reason.as_ref(), Some(reason));
        }
        C::Cancel { reason, .. } => prop_assert_eq!(&state.reason, reason),
        C::StartProvisioning { vm_id } => prop_assert_eq!(state.vm_id, Some(*vm_id)),
        C::MarkReady { result, at } => {
            prop_assert_eq!(state.result.as_ref(), Some(result));
            prop_assert_eq!(state.provisioned_at, Some(*at));
        }
        C::Retry { .. } => {
            prop_assert_eq!(state.vm_id, None);
            prop_assert_eq!(&state.failure, &None);
            prop_assert!(state.attempt >= 2);
        }
        C::MarkFailed {
            error_code,
            message,
            retryable,
        } => {
            let failure = state.failure.as_ref().expect("failure recorded");
            prop_assert_eq!(&failure.error_code, error_code);
            prop_assert_eq!(&failure.message, message);
            prop_assert_eq!(failure.retryable, *retryable);
            prop_assert_eq!(Some(failure.vm_id), state.vm_id);
        }
        C::WaitForVcenter { since, .. } => prop_assert_eq!(state.waiting_since, Some(*since)),
        C::MarkVcenterReachable => prop_assert_eq!(state.waiting_since, None),
        C::MarkCustomizingGuest { vm_id } => {
            prop_assert!(state.customizing_guest);
            prop_assert_eq!(state.vm_id, Some(*vm_id));
        }
    }
    Ok(())
}

fn run_vms(commands: &[VmCommand]) -> Result<(Option<Vm>, Vec<VmEvent>), TestCaseError> {
    let mut state: Option<Vm> = None;
    let mut all = Vec::new();
    for command in commands {
        let before = state.as_ref().map(|s| s.status);
        let expected = vm_transition(state.as_ref(), command);
        match (Vm::handle(state.as_ref(), command), expected) {
            (Err(_), None) => {}
            (Err(e), Some(_)) => {
                return Err(TestCaseError::fail(format!(
                    "{command:?} from {before:?} should be accepted, was refused: {e}"
                )));
            }
            (Ok(events), None) => {
                return Err(TestCaseError::fail(format!(
                    "{command:?} from {before:?} should be refused, emitted {events:?}"
                )));
            }
            (Ok(events), Some(None)) => {
                prop_assert!(events.is_empty(), "a no-op emitted {:?}", events);
            }
            (Ok(events), Some(Some(to))) => {
                prop_assert_eq!(events.len(), 1, "one event per accepted VM command");
                for event in events {
                    let from = state.as_ref().map(|s| s.status);
                    let previous = state.clone();
                    state = Vm::apply(state, &event);
                    let after = state.as_ref().map(|s| s.status);
                    prop_assert!(
                        after.is_some_and(|a| vm_event_legal(from, &event, a)),
                        "illegal transition {:?} --{:?}--> {:?}",
                        from,
                        event,
                        after
                    );
                    prop_assert_ne!(&previous, &state, "an emitted event changes the state");
                    all.push(event);
                }
                prop_assert_eq!(state.as_ref().map(|s| s.status), Some(to));
                check_vm_data(state.as_ref().expect("exists"), command)?;
            }
        }
    }
    Ok((state, all))
}

fn check_vm_data(vm: &Vm, command: &VmCommand) -> Result<(), TestCaseError> {
    match command {
        VmCommand::StartProvisioning(s) => {
            prop_assert_eq!(vm.id, s.vm_id);
            prop_assert_eq!(&vm.name, &s.name);
            prop_assert_eq!(&vm.folder_path, &s.folder_path);
        }
        VmCommand::RecordProvisioned { result, at } => {
            prop_assert_eq!(vm.vmware_vm_id.as_ref(), Some(&result.vmware_vm_id));
            prop_assert_eq!(vm.ip_address, result.ip_address);
            prop_assert_eq!(vm.hostname.as_ref(), Some(&result.hostname));
            prop_assert_eq!(vm.provisioned_at, Some(*at));
            prop_assert_eq!(&vm.warning_message, &result.warning_message);
        }
        VmCommand::RecordFailed { error_code, .. } => {
            prop_assert_eq!(vm.failure.as_ref().map(|f| &f.error_code), Some(error_code));
        }
        VmCommand::RefreshGuestInfo {
            ip_address,
            hostname,
            ..
        } => {
            prop_assert_eq!(vm.ip_address, *ip_address);
            if let Some(h) = hostname {
                prop_assert_eq!(vm.hostname.as_ref(), Some(h));
            }
            if ip_address.is_some() {
                prop_assert_eq!(&vm.warning_message, &None);
            }
        }
        VmCommand::MarkDeleted { reason } => prop_assert_eq!(&vm.deleted_reason, reason),
        VmCommand::RecordPartialRemoved { vmware_vm_id } => {
            prop_assert_eq!(vm.partial_removed.as_ref(), Some(vmware_vm_id));
        }
        VmCommand::ObservePowerState { power_state } => {
            let live = match power_state {
                PowerState::PoweredOn => VmStatus::Running,
                PowerState::PoweredOff | PowerState::Suspended => VmStatus::Stopped,
            };
            prop_assert_eq!(vm.status, live);
        }
    }
    Ok(())
}

/// Every event through the store's serialized form: `to_new_event`, JSON
/// text, a `StoredEvent`, `decode`.
fn through_json<E: DomainEvent + std::fmt::Debug + PartialEq>(
    stream_type: &str,
    events: &[E],
) -> Result<Vec<E>, TestCaseError> {
    let mut decoded = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        let metadata = EventMetadata {
            event_id: EventId::from_uuid(Uuid::from_u128(0x9000 + i as u128)),
            tenant_id: TenantId::from_uuid(Uuid::from_u128(0x2000)),
            user_id: UserId::from_uuid(Uuid::from_u128(0x5000)),
            correlation_id: CorrelationId::from_uuid(Uuid::from_u128(0x8000)),
            causation_id: None,
            occurred_at: Utc.timestamp_opt(1_768_469_400, 7).single().expect("ts"),
        };
        let new_event = event.to_new_event(metadata);
        let stored = StoredEvent {
            position: i as u64 + 1,
            stream_id: StreamId::new(stream_type, Uuid::from_u128(0x1000)),
            version: i as u64 + 1,
            event_type: new_event.event_type,
            schema_version: new_event.schema_version,
            payload: new_event.payload,
            metadata: new_event.metadata,
        };
        let text = serde_json::to_string(&stored).expect("events serialize");
        let stored: StoredEvent = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("envelope does not parse: {e}\n{text}")))?;
        let event_back = E::decode(&stored)
            .map_err(|e| TestCaseError::fail(format!("does not decode: {e}\n{text}")))?;
        prop_assert_eq!(&event_back, event);
        decoded.push(event_back);
    }
    Ok(decoded)
}

fn request_commands() -> impl Strategy<Value = Vec<VmRequestCommand>> {
    prop::collection::vec(request_command(), 0..40)
}

fn vm_commands() -> impl Strategy<Value = Vec<VmCommand>> {
    // Most sequences start with a StartProvisioning so that they get going;
    // the others show what happens to commands before the VM exists.
    (
        prop::bool::weighted(0.8),
        vm_started_command(),
        prop::collection::vec(vm_command(), 0..40),
    )
        .prop_map(|(lead, first, mut rest)| {
            if lead {
                rest.insert(0, first);
            }
            rest
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) + (b) for `VmRequest`.
    #[test]
    fn request_events_replay_to_the_models_state(commands in request_commands()) {
        let (_, events) = run_requests(&commands)?;
        let mut model = RequestModel::default();
        let expected: Vec<&str> = commands.iter().filter_map(|c| model.step(c)).collect();
        let decoded = through_json(VmRequest::STREAM_TYPE, &events)?;
        let types: Vec<&str> = decoded.iter().map(DomainEvent::event_type).collect();
        prop_assert_eq!(types, expected, "the events emitted for {:?}", commands);
        model.check(VmRequest::reconstitute(&decoded).as_ref())?;
    }

    /// (a) + (b) for `Vm`.
    #[test]
    fn vm_events_replay_to_the_models_state(commands in vm_commands()) {
        let (_, events) = run_vms(&commands)?;
        let mut model = VmModel::default();
        let expected: Vec<&str> = commands.iter().filter_map(|c| model.step(c)).collect();
        let decoded = through_json(Vm::STREAM_TYPE, &events)?;
        let types: Vec<&str> = decoded.iter().map(DomainEvent::event_type).collect();
        prop_assert_eq!(types, expected, "the events emitted for {:?}", commands);
        model.check(Vm::reconstitute(&decoded).as_ref())?;
    }

    /// (b) with the commands not even aimed at the right state: anything,
    /// from any reachable state, either is refused or is legal.
    #[test]
    fn request_commands_from_any_state_never_panic(
        history in request_commands(),
        command in request_command(),
    ) {
        let (state, _) = run_requests(&history)?;
        let before = state.as_ref().map(|s| s.status);
        match VmRequest::handle(state.as_ref(), &command) {
            Ok(events) => {
                prop_assert!(request_transition(before, &command).is_some());
                let mut s = state;
                for e in &events {
                    let from = s.as_ref().map(|s| s.status);
                    s = VmRequest::apply(s, e);
                    prop_assert!(request_event_legal(from, e, s.as_ref().expect("exists").status));
                }
            }
            Err(_) => prop_assert!(request_transition(before, &command).is_none()),
        }
    }
}

/// The sequence generators do reach every status; otherwise the properties
/// above would pass while testing only the first steps of a lifecycle.
#[test]
fn generated_sequences_reach_every_status() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::with_cases(256),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let mut request_statuses = std::collections::HashSet::new();
    let mut vm_statuses = std::collections::HashSet::new();
    let mut no_op_refreshes = 0;
    let mut event_types = std::collections::HashSet::new();
    for _ in 0..256 {
        let commands = request_commands()
            .new_tree(&mut runner)
            .expect("generate")
            .current();
        let mut state = None;
        for c in &commands {
            if let Ok(events) = VmRequest::handle(state.as_ref(), c) {
                event_types.extend(events.iter().map(DomainEvent::event_type));
                state = events.iter().fold(state, VmRequest::apply);
                request_statuses.insert(state.as_ref().map(|s: &VmRequest| s.status));
            }
        }
        let commands = vm_commands()
            .new_tree(&mut runner)
            .expect("generate")
            .current();
        let mut state = None;
        for c in &commands {
            if let Ok(events) = Vm::handle(state.as_ref(), c) {
                event_types.extend(events.iter().map(DomainEvent::event_type));
                no_op_refreshes += usize::from(events.is_empty());
                state = events.iter().fold(state, Vm::apply);
                vm_statuses.insert(state.as_ref().map(|s: &Vm| s.status));
            }
        }
    }
    assert_eq!(request_statuses.len(), 7, "{request_statuses:?}");
    assert_eq!(vm_statuses.len(), 6, "{vm_statuses:?}");
    assert!(no_op_refreshes > 0, "some refreshes change nothing");
    // The lifecycle after the request is exercised too, not only reachable.
    for kind in [
        "VmRequestRetried",
        "VmRequestReady",
        "VmPartialRemoved",
        "VmPowerStateObserved",
        "VmDeleted",
    ] {
        assert!(event_types.contains(kind), "no sequence emitted {kind}");
    }
}

// ---------------------------------------------------------------------------
// (c) VmName.

/// The part a failing `VmName::new` must blame: the prefix when it is no
/// label or leaves no room for `-x`, otherwise the requested name.
fn blamed_part(prefix: &str, requested: &str) -> Option<NamePart> {
    if is_label(prefix) && is_label(requested) && prefix.len() + 1 + requested.len() <= 63 {
        None
    } else if !is_label(prefix) || prefix.len() > 61 {
        Some(NamePart::ProjectPrefix)
    } else {
        Some(NamePart::RequestedName)
    }
}

/// The error's details are true of the value it blames.
fn error_is_truthful(err: &NameError, value: &str) -> Result<(), TestCaseError> {
    match err {
        NameError::Empty { .. } => prop_assert!(value.is_empty()),
        NameError::TooLong {
            value: v, len, max, ..
        } => {
            prop_assert_eq!(v, value);
            prop_assert_eq!(*len, value.chars().count());
            prop_assert!(len > max);
        }
        NameError::InvalidCharacter {
            value: v,
            found,
            index,
            ..
        } => {
            prop_assert_eq!(v, value);
            prop_assert_eq!(value.chars().nth(*index), Some(*found));
            prop_assert!(!(found.is_ascii_lowercase() || found.is_ascii_digit() || *found == '-'));
            prop_assert!(
                value
                    .chars()
                    .take(*index)
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "the first bad character is reported"
            );
        }
        NameError::EdgeHyphen { value: v, .. } => {
            prop_assert_eq!(v, value);
            prop_assert!(value.starts_with('-') || value.ends_with('-'));
        }
    }
    let message = err.to_string();
    prop_assert!(
        message.starts_with(&err.part().to_string()),
        "the message names the part: {}",
        message
    );
    Ok(())
}

fn check_new(prefix: &str, requested: &str) -> Result<(), TestCaseError> {
    match (
        VmName::new(prefix, requested),
        blamed_part(prefix, requested),
    ) {
        (Ok(name), None) => {
            prop_assert_eq!(name.as_str(), format!("{prefix}-{requested}"));
            prop_assert!(is_label(name.as_str()));
            prop_assert_eq!(VmName::parse(name.as_str()), Ok(name.clone()));
        }
        (Err(err), Some(part)) => {
            prop_assert_eq!(err.part(), part, "{:?} + {:?}: {}", prefix, requested, err);
            let blamed = if part == NamePart::ProjectPrefix {
                prefix
            } else {
                requested
            };
            error_is_truthful(&err, blamed)?;
        }
        (Ok(name), Some(part)) => {
            return Err(TestCaseError::fail(format!(
                "{prefix:?} + {requested:?} accepted as {name}, but the {part} is wrong"
            )));
        }
        (Err(err), None) => {
            return Err(TestCaseError::fail(format!(
                "{prefix:?} + {requested:?} is valid but was refused: {err}"
            )));
        }
    }
    Ok(())
}

fn check_parse(full: &str) -> Result<(), TestCaseError> {
    match VmName::parse(full) {
        Ok(name) => {
            prop_assert!(is_label(full), "{:?} accepted", full);
            prop_assert_eq!(name.as_str(), full);
            let json = serde_json::to_string(&name).expect("serializes");
            prop_assert_eq!(serde_json::from_str::<VmName>(&json).ok(), Some(name));
        }
        Err(err) => {
            prop_assert!(!is_label(full), "{:?} refused: {}", full, err);
            prop_assert_eq!(err.part(), NamePart::FullName);
            error_is_truthful(&err, full)?;
            let json = serde_json::to_string(full).expect("serializes");
            prop_assert!(serde_json::from_str::<VmName>(&json).is_err());
        }
    }
    Ok(())
}

#[test]
fn vm_name_parse_test_vectors() {
    let a63 = "a".repeat(63);
    let a64 = "a".repeat(64);
    let hyphens63 = format!("a{}b", "-".repeat(61));
    let vectors: Vec<(&str, bool)> = vec![
        ("a", true),
        ("0", true),
        ("123456", true),
        ("web-app01", true),
        ("a--b", true),
        (&a63, true),
        (&hyphens63, true),
        (&a64, false),
        ("", false),
        ("-a", false),
        ("a-", false),
        ("-", false),
        ("A", false),
        ("web-App01", false),
        ("a_b", false),
        ("a.b", false),
        ("a b", false),
        (" a", false),
        ("a\n", false),
        ("ä", false),
        ("ａ", false),
        ("web-app01🙂", false),
    ];
    for (input, valid) in vectors {
        assert_eq!(is_label(input), valid, "reference disagrees on {input:?}");
        assert_eq!(VmName::parse(input).is_ok(), valid, "parse({input:?})");
        check_parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
    }
    assert!(matches!(
        VmName::parse(&a64),
        Err(NameError::TooLong {
            len: 64,
            max: 63,
            ..
        })
    ));
    assert!(matches!(VmName::parse(""), Err(NameError::Empty { .. })));
    assert!(matches!(
        VmName::parse("a_b"),
        Err(NameError::InvalidCharacter {
            found: '_',
            index: 1,
            ..
        })
    ));
    assert!(matches!(
        VmName::parse("a-"),
        Err(NameError::EdgeHyphen { .. })
    ));
}

#[test]
fn vm_name_new_test_vectors() {
    use NamePart::{ProjectPrefix as P, RequestedName as R};
    let a61 = "a".repeat(61);
    let a62 = "a".repeat(62);
    let c60 = "c".repeat(60);
    let c61 = "c".repeat(61);
    let vectors: Vec<(&str, &str, Option<NamePart>)> = vec![
        ("web", "app01", None),
        ("123", "456", None),
        ("w", "a", None),
        ("we--b", "a--p", None),
        (&a61, "b", None),
        ("ab", &c60, None),
        (&a61, "bb", Some(R)),
        (&a62, "b", Some(P)),
        ("ab", &c61, Some(R)),
        ("", "app", Some(P)),
        ("web", "", Some(R)),
        ("", "", Some(P)),
        ("Web", "app", Some(P)),
        ("web", "App", Some(R)),
        ("web-", "app", Some(P)),
        ("-web", "app", Some(P)),
        ("web", "-app", Some(R)),
        ("web", "app-", Some(R)),
        ("we_b", "app", Some(P)),
        ("web", "app.01", Some(R)),
        ("wéb", "app", Some(P)),
        ("web", "äpp", Some(R)),
        ("Web", "App", Some(P)),
    ];
    for (prefix, requested, part) in vectors {
        assert_eq!(
            blamed_part(prefix, requested),
            part,
            "reference on {prefix:?}+{requested:?}"
        );
        assert_eq!(
            VmName::new(prefix, requested).err().map(|e| e.part()),
            part,
            "{prefix:?} + {requested:?}"
        );
        check_new(prefix, requested).unwrap_or_else(|e| panic!("{prefix:?}+{requested:?}: {e}"));
    }
    assert!(matches!(
        VmName::new("ab", &c61),
        Err(NameError::TooLong {
            part: R,
            len: 61,
            max: 60,
            ..
        })
    ));
    assert_eq!(
        VmName::new("ab", &c61).expect_err("too long").to_string(),
        format!(
            "requested VM name \"{c61}\" is 61 characters long, but at most 60 are allowed \
             here (the whole VM name is a DNS label of at most 63 characters)"
        )
    );
    assert!(matches!(
        VmName::new("wéb", "app"),
        Err(NameError::InvalidCharacter {
            part: P,
            found: 'é',
            index: 1,
            ..
        })
    ));
}

/// Strings near the rules: the label alphabet, a little outside it, lengths
/// around 63, and any Unicode at all.
fn label_like() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9-]{0,70}",
        2 => "[a-z0-9][a-z0-9-]{58,64}[a-z0-9]",
        2 => "[a-zA-Z0-9_. -]{0,12}",
        1 => "[a-z0-9-]{0,10}[^a-z0-9-][a-z0-9-]{0,10}",
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (c) `VmName::parse` accepts exactly the RFC 1123 labels.
    #[test]
    fn vm_name_parse_matches_the_reference(full in label_like()) {
        check_parse(&full)?;
    }

    /// (c) `VmName::new` accepts exactly the valid pairs and blames the right part.
    #[test]
    fn vm_name_new_matches_the_reference(
        prefix in prop_oneof![3 => name_part(), 1 => label_like()],
        requested in prop_oneof![3 => name_part(), 1 => label_like()],
    ) {
        check_new(&prefix, &requested)?;
    }

    /// (c) Lengths right at the 63-character limit.
    #[test]
    fn vm_name_length_boundary(prefix_len in 1usize..=63, requested_len in 1usize..=63) {
        let prefix = "p".repeat(prefix_len);
        let requested = "r".repeat(requested_len);
        check_new(&prefix, &requested)?;
        prop_assert_eq!(
            VmName::new(&prefix, &requested).is_ok(),
            prefix_len + 1 + requested_len <= 63
        );
    }
}
