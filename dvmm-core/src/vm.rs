//! The `Vm` aggregate: one VM that dvmm provisions, from the start of the
//! clone to its live states.

use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::error::{DomainError, bounded_text};
use crate::event::domain_events;
use crate::ids::{TenantId, VmId, VmRequestId, VmwareVmId};
use crate::size::VmResources;
use crate::spec::{PowerState, VmName, VmPlacement, VmProvisioningResult};

/// Where a VM stands. `Ready` means "just provisioned"; `Running` and
/// `Stopped` are live states confirmed from vCenter later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmStatus {
    /// Being built.
    Provisioning,
    /// Built and powered on.
    Ready,
    /// Confirmed powered on.
    Running,
    /// Confirmed powered off (or suspended).
    Stopped,
    /// Gone.
    Deleted,
    /// Provisioning failed.
    Failed,
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The variant's name, padded to the caller's width (`{:<12}` in a
        // table); derived `Debug` ignores width.
        f.pad(&format!("{self:?}"))
    }
}

/// Provisioning started.
///
/// Schema version 2 added `placement`; version 1 events read with
/// `placement: None` (see [`upcast_provisioning_started_v1`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProvisioningStarted {
    /// The VM.
    pub vm_id: VmId,
    /// The request it fulfils.
    pub request_id: VmRequestId,
    /// Tenant.
    pub tenant_id: TenantId,
    /// VM name.
    pub name: VmName,
    /// Resources.
    pub resources: VmResources,
    /// Folder path below the datacenter's VM folder.
    pub folder_path: String,
    /// Where and how the VM is built, from the configuration of the moment
    /// it started. `None` for provisionings started by a release before it
    /// was recorded: those resume with the tenant's current configuration
    /// (and the recorded `folder_path`). Boxed: it is most of the event's
    /// size, and every other VM event would carry that size too.
    pub placement: Option<Box<VmPlacement>>,
}

/// Lifts a `VmProvisioningStarted` payload from schema version 1 to 2:
/// version 1 did not record the placement, so it is `null`.
///
/// # Errors
/// When the payload is not a JSON object.
pub fn upcast_provisioning_started_v1(
    mut payload: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let object = payload
        .as_object_mut()
        .ok_or_else(|| "the payload is not a JSON object".to_owned())?;
    object.entry("placement").or_insert(serde_json::Value::Null);
    Ok(payload)
}

/// The VM exists and is powered on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProvisioned {
    /// vSphere's id.
    pub vmware_vm_id: VmwareVmId,
    /// Guest IP, if known.
    pub ip_address: Option<IpAddr>,
    /// Guest hostname.
    pub hostname: String,
    /// When it became ready.
    pub provisioned_at: DateTime<Utc>,
    /// What is incomplete, if anything.
    pub warning_message: Option<String>,
}

/// Provisioning failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProvisioningFailed {
    /// Machine-readable code.
    pub error_code: String,
    /// What a user can act on.
    pub message: String,
    /// Whether a retry may help.
    pub retryable: bool,
}

/// Fresh guest facts were read from vCenter (e.g. the IP arrived later).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGuestInfoRefreshed {
    /// Guest IP, if reported.
    pub ip_address: Option<IpAddr>,
    /// Guest hostname, if reported.
    pub hostname: Option<String>,
    /// Power state.
    pub power_state: PowerState,
}

/// The VM was deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDeleted {
    /// Why, if known.
    pub reason: Option<String>,
}

/// What a failed provisioning left on vCenter is dealt with: the partial
/// VM is powered off and destroyed, or there was none. Recorded just before
/// the removal, so that a rerun after a crash knows which VM to finish
/// removing; the timeline entry follows the removal. The VM stays `Failed`
/// (its failure is the record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPartialRemoved {
    /// The VM that was destroyed; `None` when the failed provisioning had
    /// not created one (or it was already gone).
    pub vmware_vm_id: Option<VmwareVmId>,
}

/// vCenter reported a power state that changes the VM's live status
/// (`Ready` → `Running` on the first observation, `Running` ↔ `Stopped`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPowerStateObserved {
    /// What vCenter said.
    pub power_state: PowerState,
}

/// Everything recorded on a VM stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum VmEvent {
    /// See [`VmProvisioningStarted`].
    VmProvisioningStarted(VmProvisioningStarted),
    /// See [`VmProvisioned`].
    VmProvisioned(VmProvisioned),
    /// See [`VmProvisioningFailed`].
    VmProvisioningFailed(VmProvisioningFailed),
    /// See [`VmGuestInfoRefreshed`].
    VmGuestInfoRefreshed(VmGuestInfoRefreshed),
    /// See [`VmDeleted`].
    VmDeleted(VmDeleted),
    /// See [`VmPartialRemoved`].
    VmPartialRemoved(VmPartialRemoved),
    /// See [`VmPowerStateObserved`].
    VmPowerStateObserved(VmPowerStateObserved),
}

domain_events!(VmEvent {
    VmProvisioningStarted(VmProvisioningStarted) = 2,
    VmProvisioned(VmProvisioned) = 1,
    VmProvisioningFailed(VmProvisioningFailed) = 1,
    VmGuestInfoRefreshed(VmGuestInfoRefreshed) = 1,
    VmDeleted(VmDeleted) = 1,
    VmPartialRemoved(VmPartialRemoved) = 1,
    VmPowerStateObserved(VmPowerStateObserved) = 1,
});

/// What a VM can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmCommand {
    /// Start provisioning a new VM.
    StartProvisioning(VmProvisioningStarted),
    /// Record the successful outcome.
    RecordProvisioned {
        /// What vSphere returned.
        result: VmProvisioningResult,
        /// When.
        at: DateTime<Utc>,
    },
    /// Record a failure.
    RecordFailed {
        /// Machine-readable code.
        error_code: String,
        /// What a user can act on.
        message: String,
        /// Whether a retry may help.
        retryable: bool,
    },
    /// Record live guest facts; emits nothing if nothing changed.
    RefreshGuestInfo {
        /// Guest IP.
        ip_address: Option<IpAddr>,
        /// Guest hostname.
        hostname: Option<String>,
        /// Power state.
        power_state: PowerState,
    },
    /// Record that the VM is gone (decommissioned). Refused while it is
    /// provisioning and once it is deleted.
    MarkDeleted {
        /// Why.
        reason: Option<String>,
    },
    /// Record that what a failed provisioning left was removed (or that
    /// nothing was left). Only for a `Failed` VM, once.
    RecordPartialRemoved {
        /// The destroyed VM, if there was one.
        vmware_vm_id: Option<VmwareVmId>,
    },
    /// Record the power state vCenter reports; emits nothing when the live
    /// status it means is the current one.
    ObservePowerState {
        /// What vCenter said.
        power_state: PowerState,
    },
}

impl VmCommand {
    fn action(&self) -> &'static str {
        match self {
            VmCommand::StartProvisioning(_) => "start provisioning",
            VmCommand::RecordProvisioned { .. } => "record provisioned",
            VmCommand::RecordFailed { .. } => "record failure of",
            VmCommand::RefreshGuestInfo { .. } => "refresh guest info of",
            VmCommand::MarkDeleted { .. } => "delete",
            VmCommand::RecordPartialRemoved { .. } => "record the removal of the partial",
            VmCommand::ObservePowerState { .. } => "record the power state of",
        }
    }
}

/// A VM, rebuilt from its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// Id.
    pub id: VmId,
    /// The request it fulfils.
    pub request_id: VmRequestId,
    /// Tenant.
    pub tenant_id: TenantId,
    /// Name.
    pub name: VmName,
    /// Resources.
    pub resources: VmResources,
    /// Folder path.
    pub folder_path: String,
    /// Where it is built, when its start recorded that (schema version 2).
    pub placement: Option<VmPlacement>,
    /// Status.
    pub status: VmStatus,
    /// vSphere's id, once provisioned.
    pub vmware_vm_id: Option<VmwareVmId>,
    /// Latest known guest IP.
    pub ip_address: Option<IpAddr>,
    /// Latest known hostname.
    pub hostname: Option<String>,
    /// When it became ready.
    pub provisioned_at: Option<DateTime<Utc>>,
    /// Warning carried from provisioning (cleared once an IP is known).
    pub warning_message: Option<String>,
    /// The failure, if it failed.
    pub failure: Option<VmProvisioningFailed>,
    /// Once a failed provisioning's leftovers were dealt with: the VM that
    /// was destroyed (`Some(None)`: there was none).
    pub partial_removed: Option<Option<VmwareVmId>>,
    /// Why it was deleted, once it was.
    pub deleted_reason: Option<String>,
}

impl Vm {
    fn invalid(&self, command: &VmCommand) -> DomainError {
        DomainError::InvalidTransition {
            aggregate: Self::STREAM_TYPE,
            action: command.action(),
            status: self.status.to_string(),
        }
    }
}

impl Aggregate for Vm {
    const STREAM_TYPE: &'static str = "Vm";
    type Command = VmCommand;
    type Event = VmEvent;

    fn handle(state: Option<&Self>, command: &VmCommand) -> Result<Vec<VmEvent>, DomainError> {
        use VmCommand as C;
        use VmStatus as S;
        let Some(state) = state else {
            return match command {
                C::StartProvisioning(started) => {
                    Ok(vec![VmEvent::VmProvisioningStarted(started.clone())])
                }
                _ => Err(DomainError::NotFound {
                    aggregate: Self::STREAM_TYPE,
                }),
            };
        };
        let event = match (state.status, command) {
            (_, C::StartProvisioning(_)) => {
                return Err(DomainError::AlreadyExists {
                    aggregate: Self::STREAM_TYPE,
                });
            }
            (S::Provisioning, C::RecordProvisioned { result, at }) => {
                VmEvent::VmProvisioned(VmProvisioned {
                    vmware_vm_id: result.vmware_vm_id.clone(),
                    ip_address: result.ip_address,
                    hostname: result.hostname.clone(),
                    provisioned_at: *at,
                    warning_message: result.warning_message.clone(),
                })
            }
            (
                S::Provisioning,
                C::RecordFailed {
                    error_code,
                    message,
                    retryable,
                },
            ) => VmEvent::VmProvisioningFailed(VmProvisioningFailed {
                error_code: error_code.clone(),
                message: message.clone(),
                retryable: *retryable,
            }),
            (
                S::Ready | S::Running | S::Stopped,
                C::RefreshGuestInfo {
                    ip_address,
                    hostname,
                    power_state,
                },
            ) => {
                let status = live_status(*power_state);
                let unchanged = state.status == status
                    && state.ip_address == *ip_address
                    && (hostname.is_none() || state.hostname == *hostname);
                if unchanged {
                    return Ok(Vec::new());
                }
                VmEvent::VmGuestInfoRefreshed(VmGuestInfoRefreshed {
                    ip_address: *ip_address,
                    hostname: hostname.clone(),
                    power_state: *power_state,
                })
            }
            (S::Ready | S::Running | S::Stopped | S::Failed, C::MarkDeleted { reason }) => {
                if let Some(reason) = reason {
                    bounded_text("reason", reason)?;
                }
                VmEvent::VmDeleted(VmDeleted {
                    reason: reason.clone(),
                })
            }
            (S::Failed, C::RecordPartialRemoved { vmware_vm_id })
                if state.partial_removed.is_none() =>
            {
                VmEvent::VmPartialRemoved(VmPartialRemoved {
                    vmware_vm_id: vmware_vm_id.clone(),
                })
            }
            (S::Ready | S::Running | S::Stopped, C::ObservePowerState { power_state }) => {
                if live_status(*power_state) == state.status {
                    return Ok(Vec::new());
                }
                VmEvent::VmPowerStateObserved(VmPowerStateObserved {
                    power_state: *power_state,
                })
            }
            _ => return Err(state.invalid(command)),
        };
        Ok(vec![event])
    }

    fn apply(state: Option<Self>, event: &VmEvent) -> Option<Self> {
        let mut state = match (state, event) {
            (None, VmEvent::VmProvisioningStarted(e)) => {
                return Some(Vm {
                    id: e.vm_id,
                    request_id: e.request_id,
                    tenant_id: e.tenant_id,
                    name: e.name.clone(),
                    resources: e.resources,
                    folder_path: e.folder_path.clone(),
                    placement: e.placement.as_deref().cloned(),
                    status: VmStatus::Provisioning,
                    vmware_vm_id: None,
                    ip_address: None,
                    hostname: None,
                    provisioned_at: None,
                    warning_message: None,
                    failure: None,
                    partial_removed: None,
                    deleted_reason: None,
                });
            }
            (None, _) => return None,
            (Some(state), _) => state,
        };
        match event {
            VmEvent::VmProvisioningStarted(_) => {}
            VmEvent::VmProvisioned(e) => {
                state.status = VmStatus::Ready;
                state.vmware_vm_id = Some(e.vmware_vm_id.clone());
                state.ip_address = e.ip_address;
                state.hostname = Some(e.hostname.clone());
                state.provisioned_at = Some(e.provisioned_at);
                state.warning_message = e.warning_message.clone();
            }
            VmEvent::VmProvisioningFailed(e) => {
                state.status = VmStatus::Failed;
                state.failure = Some(e.clone());
            }
            VmEvent::VmGuestInfoRefreshed(e) => {
                state.status = live_status(e.power_state);
                state.ip_address = e.ip_address;
                if e.hostname.is_some() {
                    state.hostname = e.hostname.clone();
                }
                if e.ip_address.is_some() {
                    state.warning_message = None;
                }
            }
            VmEvent::VmDeleted(e) => {
                state.status = VmStatus::Deleted;
                state.deleted_reason = e.reason.clone();
            }
            VmEvent::VmPartialRemoved(e) => state.partial_removed = Some(e.vmware_vm_id.clone()),
            VmEvent::VmPowerStateObserved(e) => state.status = live_status(e.power_state),
        }
        Some(state)
    }
}

fn live_status(power_state: PowerState) -> VmStatus {
    match power_state {
        PowerState::PoweredOn => VmStatus::Running,
        PowerState::PoweredOff | PowerState::Suspended => VmStatus::Stopped,
    }
}
