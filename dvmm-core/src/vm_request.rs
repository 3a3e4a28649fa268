//! The `VmRequest` aggregate: a user's request for a VM, from submission to a
//! ready VM (or rejection, cancellation, failure).

use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::error::{DomainError, bounded_text};
use crate::event::domain_events;
use crate::ids::{ProjectId, TenantId, UserId, VmId, VmRequestId, VmwareVmId};
use crate::size::{VmResources, VmSize};
use crate::spec::{VmName, VmProvisioningResult};

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmRequestStatus {
    /// Submitted, waiting for a decision.
    Pending,
    /// Approved; provisioning may start.
    Approved,
    /// Turned down by an approver.
    Rejected,
    /// Withdrawn before provisioning started.
    Cancelled,
    /// The VM is being built.
    Provisioning,
    /// The VM exists and is powered on.
    Ready,
    /// Provisioning failed.
    Failed,
}

impl fmt::Display for VmRequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The variant's name, padded to the caller's width (`{:<12}` in a
        // table); derived `Debug` ignores width.
        f.pad(&format!("{self:?}"))
    }
}

/// A request was submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestCreated {
    /// The request.
    pub request_id: VmRequestId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Project inside the tenant.
    pub project_id: ProjectId,
    /// The project's name prefix (also its folder name).
    pub project_prefix: String,
    /// The name the user asked for.
    pub requested_name: String,
    /// `{project_prefix}-{requested_name}`.
    pub vm_name: VmName,
    /// Requested size.
    pub size: VmSize,
    /// What the size meant when the request was made.
    pub resources: VmResources,
    /// Who asked.
    pub requested_by: UserId,
    /// Why the user needs it.
    pub justification: String,
}

/// A request was approved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestApproved {
    /// Who approved it.
    pub approved_by: UserId,
}

/// A request was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestRejected {
    /// Who rejected it.
    pub rejected_by: UserId,
    /// Why.
    pub reason: String,
}

/// A request was cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestCancelled {
    /// Who cancelled it.
    pub cancelled_by: UserId,
    /// Why, if given.
    pub reason: Option<String>,
}

/// Provisioning of the request's VM started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestProvisioningStarted {
    /// The VM being built.
    pub vm_id: VmId,
}

/// The request's VM is ready.
///
/// Schema version 2 added `provisioned_at`; version 1 events read with
/// `provisioned_at: None` (see [`upcast_ready_v1`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestReady {
    /// dvmm's VM.
    pub vm_id: VmId,
    /// vSphere's id of it.
    pub vmware_vm_id: VmwareVmId,
    /// Guest IP, if known yet.
    pub ip_address: Option<IpAddr>,
    /// Guest hostname.
    pub hostname: String,
    /// When the VM became ready (the same instant as the VM stream's
    /// `VmProvisioned`). `None` only for events written before schema
    /// version 2, which did not record it; their metadata's `occurred_at`
    /// is the closest known time.
    pub provisioned_at: Option<DateTime<Utc>>,
    /// What is incomplete, if anything.
    pub warning_message: Option<String>,
}

/// The request's VM is powered on and its guest is applying the
/// customization (hostname, network); the VM is ready once vCenter reports
/// the outcome and the guest its address. Written once per attempt, when
/// the vSphere port starts waiting for that outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestCustomizingGuest {
    /// The VM being customized.
    pub vm_id: VmId,
}

/// Lifts a `VmRequestReady` payload from schema version 1 to 2: version 1
/// did not record when the VM became ready, so it is `null`.
///
/// # Errors
/// When the payload is not a JSON object.
pub fn upcast_ready_v1(mut payload: serde_json::Value) -> Result<serde_json::Value, String> {
    let object = payload
        .as_object_mut()
        .ok_or_else(|| "the payload is not a JSON object".to_owned())?;
    object
        .entry("provisioned_at")
        .or_insert(serde_json::Value::Null);
    Ok(payload)
}

/// A failed request was sent back through provisioning: a new attempt,
/// with a new VM, starts from `Approved`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestRetried {
    /// Who asked for the retry.
    pub retried_by: UserId,
    /// The VM of the attempt that failed.
    pub failed_vm_id: VmId,
    /// The number of the attempt this starts (the first was 1).
    pub attempt: u32,
}

/// Provisioning failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestProvisioningFailed {
    /// The VM that was being built.
    pub vm_id: VmId,
    /// Machine-readable code, e.g. `InsufficientResources`.
    pub error_code: String,
    /// What a user can act on.
    pub message: String,
    /// Whether trying again may help.
    pub retryable: bool,
}

/// The request's vCenter could not be reached, so provisioning waits for
/// it instead of failing. Written once per outage: the request waits until
/// vCenter answers again or the tenant's unavailable deadline, counted from
/// `since`, has passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestWaitingForVcenter {
    /// When this request started waiting.
    pub since: DateTime<Utc>,
    /// What the attempt met, e.g. `Transport` or `CircuitOpen`.
    pub error_code: String,
}

/// vCenter answered again after the request waited for it, and the request
/// is still being provisioned (when the answer finishes it, the `Ready` or
/// `Failed` event ends the wait instead). A later outage starts a new wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequestVcenterReachable {
    /// When the wait that ends here began.
    pub waiting_since: DateTime<Utc>,
}

/// Everything recorded on a request stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum VmRequestEvent {
    /// See [`VmRequestCreated`].
    VmRequestCreated(VmRequestCreated),
    /// See [`VmRequestApproved`].
    VmRequestApproved(VmRequestApproved),
    /// See [`VmRequestRejected`].
    VmRequestRejected(VmRequestRejected),
    /// See [`VmRequestCancelled`].
    VmRequestCancelled(VmRequestCancelled),
    /// See [`VmRequestProvisioningStarted`].
    VmRequestProvisioningStarted(VmRequestProvisioningStarted),
    /// See [`VmRequestReady`].
    VmRequestReady(VmRequestReady),
    /// See [`VmRequestProvisioningFailed`].
    VmRequestProvisioningFailed(VmRequestProvisioningFailed),
    /// See [`VmRequestWaitingForVcenter`].
    VmRequestWaitingForVcenter(VmRequestWaitingForVcenter),
    /// See [`VmRequestVcenterReachable`].
    VmRequestVcenterReachable(VmRequestVcenterReachable),
    /// See [`VmRequestRetried`].
    VmRequestRetried(VmRequestRetried),
    /// See [`VmRequestCustomizingGuest`].
    VmRequestCustomizingGuest(VmRequestCustomizingGuest),
}

domain_events!(VmRequestEvent {
    VmRequestCreated(VmRequestCreated) = 1,
    VmRequestApproved(VmRequestApproved) = 1,
    VmRequestRejected(VmRequestRejected) = 1,
    VmRequestCancelled(VmRequestCancelled) = 1,
    VmRequestProvisioningStarted(VmRequestProvisioningStarted) = 1,
    VmRequestReady(VmRequestReady) = 2,
    VmRequestProvisioningFailed(VmRequestProvisioningFailed) = 1,
    VmRequestWaitingForVcenter(VmRequestWaitingForVcenter) = 1,
    VmRequestVcenterReachable(VmRequestVcenterReachable) = 1,
    VmRequestRetried(VmRequestRetried) = 1,
    VmRequestCustomizingGuest(VmRequestCustomizingGuest) = 1,
});

/// The data of a new request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitVmRequest {
    /// Id for the new request.
    pub request_id: VmRequestId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Project.
    pub project_id: ProjectId,
    /// Project prefix; validated as part of the name.
    pub project_prefix: String,
    /// Requested name; validated as part of the name.
    pub requested_name: String,
    /// Size.
    pub size: VmSize,
    /// What the size means (from the tenant's size table).
    pub resources: VmResources,
    /// Who asks.
    pub requested_by: UserId,
    /// Why.
    pub justification: String,
}

/// What a request can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRequestCommand {
    /// File a new request.
    Submit(SubmitVmRequest),
    /// Approve a pending request.
    Approve {
        /// Approver.
        by: UserId,
    },
    /// Reject a pending request.
    Reject {
        /// Approver.
        by: UserId,
        /// Why (required).
        reason: String,
    },
    /// Withdraw a pending or approved request.
    Cancel {
        /// Who.
        by: UserId,
        /// Why, if given.
        reason: Option<String>,
    },
    /// Start building the VM of an approved request.
    StartProvisioning {
        /// The VM's id.
        vm_id: VmId,
    },
    /// The VM is ready.
    MarkReady {
        /// What vSphere returned.
        result: VmProvisioningResult,
        /// When it became ready.
        at: DateTime<Utc>,
    },
    /// Provisioning failed.
    MarkFailed {
        /// Machine-readable code.
        error_code: String,
        /// What a user can act on.
        message: String,
        /// Whether a retry may help.
        retryable: bool,
    },
    /// vCenter cannot be reached: the provisioning request waits for it.
    /// Refused while it already waits (one wait per outage).
    WaitForVcenter {
        /// Now: when the wait starts.
        since: DateTime<Utc>,
        /// What the attempt met.
        error_code: String,
    },
    /// vCenter answered again; refused unless the request waits.
    MarkVcenterReachable,
    /// The guest of the request's VM started customizing. Refused unless
    /// the request is provisioning that VM, and once it was recorded for
    /// it (one entry per attempt, however often a resume reports it).
    MarkCustomizingGuest {
        /// The VM whose guest customizes.
        vm_id: VmId,
    },
    /// Send a failed request back through provisioning (a new attempt with
    /// a new VM). Only from `Failed`.
    Retry {
        /// Who asks.
        by: UserId,
    },
}

impl VmRequestCommand {
    fn action(&self) -> &'static str {
        match self {
            VmRequestCommand::Submit(_) => "submit",
            VmRequestCommand::Approve { .. } => "approve",
            VmRequestCommand::Reject { .. } => "reject",
            VmRequestCommand::Cancel { .. } => "cancel",
            VmRequestCommand::StartProvisioning { .. } => "start provisioning",
            VmRequestCommand::MarkReady { .. } => "mark ready",
            VmRequestCommand::MarkFailed { .. } => "mark failed",
            VmRequestCommand::WaitForVcenter { .. } => "wait for vCenter",
            VmRequestCommand::MarkVcenterReachable => "mark vCenter reachable",
            VmRequestCommand::Retry { .. } => "retry",
            VmRequestCommand::MarkCustomizingGuest { .. } => "mark customizing guest",
        }
    }
}

/// A VM request, rebuilt from its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRequest {
    /// Id.
    pub id: VmRequestId,
    /// Tenant.
    pub tenant_id: TenantId,
    /// Project.
    pub project_id: ProjectId,
    /// Project prefix.
    pub project_prefix: String,
    /// Requested name.
    pub requested_name: String,
    /// Full VM name.
    pub vm_name: VmName,
    /// Size.
    pub size: VmSize,
    /// Resources of the size.
    pub resources: VmResources,
    /// Requester.
    pub requested_by: UserId,
    /// Justification.
    pub justification: String,
    /// Status.
    pub status: VmRequestStatus,
    /// Who approved or rejected it.
    pub decided_by: Option<UserId>,
    /// Rejection or cancellation reason.
    pub reason: Option<String>,
    /// The VM, once provisioning started.
    pub vm_id: Option<VmId>,
    /// The outcome, once ready.
    pub result: Option<VmProvisioningResult>,
    /// The failure, once failed.
    pub failure: Option<VmRequestProvisioningFailed>,
    /// Since when the request waits for an unreachable vCenter, while it
    /// does.
    pub waiting_since: Option<DateTime<Utc>>,
    /// The provisioning attempt (1 until a retry).
    pub attempt: u32,
    /// When its VM became ready, once it did (`None` as well for a ready
    /// recorded before that was kept).
    pub provisioned_at: Option<DateTime<Utc>>,
    /// The VMs of earlier attempts that failed, oldest first.
    pub failed_vm_ids: Vec<VmId>,
    /// Whether this attempt's guest was recorded customizing.
    pub customizing_guest: bool,
}

impl VmRequest {
    fn invalid(&self, command: &VmRequestCommand) -> DomainError {
        DomainError::InvalidTransition {
            aggregate: Self::STREAM_TYPE,
            action: command.action(),
            status: self.status.to_string(),
        }
    }
}

impl Aggregate for VmRequest {
    const STREAM_TYPE: &'static str = "VmRequest";
    type Command = VmRequestCommand;
    type Event = VmRequestEvent;

    fn handle(
        state: Option<&Self>,
        command: &VmRequestCommand,
    ) -> Result<Vec<VmRequestEvent>, DomainError> {
        use VmRequestCommand as C;
        use VmRequestStatus as S;
        let Some(state) = state else {
            return match command {
                C::Submit(submit) => {
                    let vm_name = VmName::new(&submit.project_prefix, &submit.requested_name)?;
                    submit
                        .resources
                        .validate("resources")
                        .map_err(|e| DomainError::Invalid(e.to_string()))?;
                    bounded_text("justification", &submit.justification)?;
                    Ok(vec![VmRequestEvent::VmRequestCreated(VmRequestCreated {
                        request_id: submit.request_id,
                        tenant_id: submit.tenant_id,
                        project_id: submit.project_id,
                        project_prefix: submit.project_prefix.clone(),
                        requested_name: submit.requested_name.clone(),
                        vm_name,
                        size: submit.size,
                        resources: submit.resources,
                        requested_by: submit.requested_by,
                        justification: submit.justification.clone(),
                    })])
                }
                _ => Err(DomainError::NotFound {
                    aggregate: Self::STREAM_TYPE,
                }),
            };
        };
        let event = match (state.status, command) {
            (_, C::Submit(_)) => {
                return Err(DomainError::AlreadyExists {
                    aggregate: Self::STREAM_TYPE,
                });
            }
            (S::Pending, C::Approve { by }) => {
                VmRequestEvent::VmRequestApproved(VmRequestApproved { approved_by: *by })
            }
            (S::Pending, C::Reject { by, reason }) => {
                if reason.trim().is_empty() {
                    return Err(DomainError::Invalid(
                        "a rejection needs a reason the requester can read".into(),
                    ));
                }
                bounded_text("reason", reason)?;
                VmRequestEvent::VmRequestRejected(VmRequestRejected {
                    rejected_by: *by,
                    reason: reason.clone(),
                })
            }
            (S::Pending | S::Approved, C::Cancel { by, reason }) => {
                if let Some(reason) = reason {
                    bounded_text("reason", reason)?;
                }
                VmRequestEvent::VmRequestCancelled(VmRequestCancelled {
                    cancelled_by: *by,
                    reason: reason.clone(),
                })
            }
            (S::Approved, C::StartProvisioning { vm_id }) => {
                VmRequestEvent::VmRequestProvisioningStarted(VmRequestProvisioningStarted {
                    vm_id: *vm_id,
                })
            }
            (S::Provisioning, C::MarkReady { result, at }) => {
                VmRequestEvent::VmRequestReady(VmRequestReady {
                    vm_id: state.vm_id.ok_or_else(|| state.invalid(command))?,
                    vmware_vm_id: result.vmware_vm_id.clone(),
                    ip_address: result.ip_address,
                    hostname: result.hostname.clone(),
                    provisioned_at: Some(*at),
                    warning_message: result.warning_message.clone(),
                })
            }
            (S::Failed, C::Retry { by }) => VmRequestEvent::VmRequestRetried(VmRequestRetried {
                retried_by: *by,
                failed_vm_id: state.vm_id.ok_or_else(|| state.invalid(command))?,
                attempt: state.attempt.saturating_add(1),
            }),
            (
                S::Provisioning,
                C::MarkFailed {
                    error_code,
                    message,
                    retryable,
                },
            ) => VmRequestEvent::VmRequestProvisioningFailed(VmRequestProvisioningFailed {
                vm_id: state.vm_id.ok_or_else(|| state.invalid(command))?,
                error_code: error_code.clone(),
                message: message.clone(),
                retryable: *retryable,
            }),
            (S::Provisioning, C::WaitForVcenter { since, error_code })
                if state.waiting_since.is_none() =>
            {
                VmRequestEvent::VmRequestWaitingForVcenter(VmRequestWaitingForVcenter {
                    since: *since,
                    error_code: error_code.clone(),
                })
            }
            (S::Provisioning, C::MarkCustomizingGuest { vm_id })
                if state.vm_id == Some(*vm_id) && !state.customizing_guest =>
            {
                VmRequestEvent::VmRequestCustomizingGuest(VmRequestCustomizingGuest {
                    vm_id: *vm_id,
                })
            }
            (S::Provisioning, C::MarkVcenterReachable) => {
                let waiting_since = state.waiting_since.ok_or_else(|| state.invalid(command))?;
                VmRequestEvent::VmRequestVcenterReachable(VmRequestVcenterReachable {
                    waiting_since,
                })
            }
            _ => return Err(state.invalid(command)),
        };
        Ok(vec![event])
    }

    fn apply(state: Option<Self>, event: &VmRequestEvent) -> Option<Self> {
        use VmRequestEvent as E;
        let mut state = match (state, event) {
            (None, E::VmRequestCreated(e)) => {
                return Some(VmRequest {
                    id: e.request_id,
                    tenant_id: e.tenant_id,
                    project_id: e.project_id,
                    project_prefix: e.project_prefix.clone(),
                    requested_name: e.requested_name.clone(),
                    vm_name: e.vm_name.clone(),
                    size: e.size,
                    resources: e.resources,
                    requested_by: e.requested_by,
                    justification: e.justification.clone(),
                    status: VmRequestStatus::Pending,
                    decided_by: None,
                    reason: None,
                    vm_id: None,
                    result: None,
                    failure: None,
                    waiting_since: None,
                    attempt: 1,
                    provisioned_at: None,
                    failed_vm_ids: Vec::new(),
                    customizing_guest: false,
                });
            }
            // An event without a creation before it is not ours to invent.
            (None, _) => return None,
            (Some(state), _) => state,
        };
        match event {
            E::VmRequestCreated(_) => {}
            E::VmRequestApproved(e) => {
                state.status = VmRequestStatus::Approved;
                state.decided_by = Some(e.approved_by);
            }
            E::VmRequestRejected(e) => {
                state.status = VmRequestStatus::Rejected;
                state.decided_by = Some(e.rejected_by);
                state.reason = Some(e.reason.clone());
            }
            E::VmRequestCancelled(e) => {
                state.status = VmRequestStatus::Cancelled;
                state.reason = e.reason.clone();
            }
            E::VmRequestProvisioningStarted(e) => {
                state.status = VmRequestStatus::Provisioning;
                state.vm_id = Some(e.vm_id);
            }
            E::VmRequestReady(e) => {
                state.status = VmRequestStatus::Ready;
                state.waiting_since = None;
                state.result = Some(VmProvisioningResult {
                    vmware_vm_id: e.vmware_vm_id.clone(),
                    ip_address: e.ip_address,
                    hostname: e.hostname.clone(),
                    warning_message: e.warning_message.clone(),
                });
                state.provisioned_at = e.provisioned_at;
            }
            E::VmRequestProvisioningFailed(e) => {
                state.status = VmRequestStatus::Failed;
                state.failure = Some(e.clone());
                state.waiting_since = None;
            }
            E::VmRequestWaitingForVcenter(e) => state.waiting_since = Some(e.since),
            E::VmRequestVcenterReachable(_) => state.waiting_since = None,
            E::VmRequestRetried(e) => {
                state.status = VmRequestStatus::Approved;
                state.attempt = e.attempt;
                state.failed_vm_ids.push(e.failed_vm_id);
                state.vm_id = None;
                state.failure = None;
                state.waiting_since = None;
                state.customizing_guest = false;
            }
            E::VmRequestCustomizingGuest(_) => state.customizing_guest = true,
        }
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::MAX_TEXT_CHARS;
    use crate::size::VmResources;

    fn submit(justification: String) -> VmRequestCommand {
        VmRequestCommand::Submit(SubmitVmRequest {
            request_id: VmRequestId::from_uuid(uuid::Uuid::from_u128(1)),
            tenant_id: TenantId::from_uuid(uuid::Uuid::from_u128(2)),
            project_id: ProjectId::from_uuid(uuid::Uuid::from_u128(3)),
            project_prefix: "web".into(),
            requested_name: "app01".into(),
            size: VmSize::S,
            resources: VmResources {
                cpu: 1,
                memory_mib: 1024,
                disk_gib: 10,
            },
            requested_by: UserId::from_uuid(uuid::Uuid::from_u128(4)),
            justification,
        })
    }

    #[test]
    fn over_long_free_text_is_a_typed_error_naming_the_field() {
        // Multi-byte characters: the limit counts characters, not bytes.
        let at_limit = "é".repeat(MAX_TEXT_CHARS);
        let events = VmRequest::handle(None, &submit(at_limit)).expect("at the limit is fine");
        let state = events.iter().fold(None, VmRequest::apply);

        let over = "x".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(
            VmRequest::handle(None, &submit(over.clone())),
            Err(DomainError::TooLong {
                field: "justification",
                max: MAX_TEXT_CHARS,
                actual: MAX_TEXT_CHARS + 1
            })
        );
        let by = UserId::from_uuid(uuid::Uuid::from_u128(5));
        let reject = VmRequestCommand::Reject {
            by,
            reason: over.clone(),
        };
        assert!(matches!(
            VmRequest::handle(state.as_ref(), &reject),
            Err(DomainError::TooLong {
                field: "reason",
                ..
            })
        ));
        let cancel = VmRequestCommand::Cancel {
            by,
            reason: Some(over),
        };
        assert!(matches!(
            VmRequest::handle(state.as_ref(), &cancel),
            Err(DomainError::TooLong {
                field: "reason",
                ..
            })
        ));
        let cancel = VmRequestCommand::Cancel { by, reason: None };
        assert!(VmRequest::handle(state.as_ref(), &cancel).is_ok());
    }

    /// The request after `commands`, each of which must be accepted.
    fn after(mut state: Option<VmRequest>, commands: &[VmRequestCommand]) -> VmRequest {
        for command in commands {
            let events = VmRequest::handle(state.as_ref(), command).expect("a valid transition");
            state = events.iter().fold(state, VmRequest::apply);
        }
        state.expect("a request")
    }

    fn provisioning(vm_id: VmId) -> VmRequest {
        let by = UserId::from_uuid(uuid::Uuid::from_u128(5));
        after(
            None,
            &[
                submit("needed".into()),
                VmRequestCommand::Approve { by },
                VmRequestCommand::StartProvisioning { vm_id },
            ],
        )
    }

    #[test]
    fn customizing_is_recorded_once_per_attempt_and_only_for_its_vm() {
        let vm = VmId::from_uuid(uuid::Uuid::from_u128(6));
        let state = provisioning(vm);
        let other = VmId::from_uuid(uuid::Uuid::from_u128(7));
        assert!(matches!(
            VmRequest::handle(
                Some(&state),
                &VmRequestCommand::MarkCustomizingGuest { vm_id: other }
            ),
            Err(DomainError::InvalidTransition { .. })
        ));
        let mark = VmRequestCommand::MarkCustomizingGuest { vm_id: vm };
        let events = VmRequest::handle(Some(&state), &mark).expect("first report");
        assert_eq!(
            events,
            [VmRequestEvent::VmRequestCustomizingGuest(
                VmRequestCustomizingGuest { vm_id: vm }
            )]
        );
        let state = events
            .iter()
            .fold(Some(state), VmRequest::apply)
            .expect("a request");
        assert!(state.customizing_guest);
        assert!(
            matches!(
                VmRequest::handle(Some(&state), &mark),
                Err(DomainError::InvalidTransition { .. })
            ),
            "a resume reporting it again records nothing"
        );

        // The next attempt (after a failure and a retry) customizes anew.
        let failed = VmRequestCommand::MarkFailed {
            error_code: "CustomizationFailed".into(),
            message: "customization failed".into(),
            retryable: true,
        };
        let by = UserId::from_uuid(uuid::Uuid::from_u128(5));
        let next = VmId::from_uuid(uuid::Uuid::from_u128(8));
        let state = after(
            Some(state),
            &[
                failed,
                VmRequestCommand::Retry { by },
                VmRequestCommand::StartProvisioning { vm_id: next },
            ],
        );
        assert!(!state.customizing_guest);
        assert!(
            VmRequest::handle(
                Some(&state),
                &VmRequestCommand::MarkCustomizingGuest { vm_id: next }
            )
            .is_ok()
        );
    }
}
