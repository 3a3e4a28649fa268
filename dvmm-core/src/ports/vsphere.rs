//! vSphere: creating and inspecting VMs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::config::VcenterEndpoint;
use crate::ids::{VmId, VmwareVmId};
use crate::spec::{VmGuestInfo, VmProvisioningResult, VmSpec};

/// A vSphere operation failed. Adapters map SOAP faults and transport
/// failures onto these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VsphereError {
    /// The credentials were refused.
    #[error("vCenter refused the login for user {username}: check the tenant's credentials")]
    InvalidLogin {
        /// The user (never the password).
        username: String,
    },
    /// The session is not (or no longer) logged in.
    #[error("the vCenter session is not authenticated")]
    NotAuthenticated,
    /// An object of that name already exists where it was to be created.
    #[error(
        "a VM or folder named {name:?} already exists in {location:?} and was not created by this request"
    )]
    DuplicateName {
        /// The name.
        name: String,
        /// Where.
        location: String,
    },
    /// Something the spec names does not exist.
    #[error("{kind} {name:?} was not found in vCenter")]
    NotFound {
        /// What kind of object (`template`, `datastore`, `network`, …).
        kind: String,
        /// The name or path that was looked up.
        name: String,
    },
    /// The VM is in the wrong power state for the operation.
    #[error("the VM is in the wrong power state: {message}")]
    InvalidPowerState {
        /// vCenter's message.
        message: String,
    },
    /// Not enough CPU, memory or disk where the VM was to be placed.
    #[error("insufficient resources: {message}")]
    InsufficientResources {
        /// vCenter's message.
        message: String,
    },
    /// A vSphere task ended in error.
    #[error("vSphere task failed with {fault}: {message}")]
    TaskFailed {
        /// The fault type, e.g. `InvalidDeviceSpec`.
        fault: String,
        /// vCenter's message.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("timed out waiting for {operation}")]
    Timeout {
        /// What was waited for.
        operation: String,
    },
    /// The vCenter could not be reached or the connection broke.
    #[error("could not reach vCenter: {message}")]
    Transport {
        /// What happened.
        message: String,
    },
    /// vCenter's certificate was not accepted.
    #[error("vCenter's TLS certificate was rejected: {message}")]
    Tls {
        /// Why.
        message: String,
    },
    /// Calls are suspended after repeated transport failures.
    #[error("circuit breaker open for {endpoint}: vCenter failed repeatedly, retry later")]
    CircuitOpen {
        /// The vCenter URL.
        endpoint: String,
    },
    /// vCenter answered something that could not be understood.
    #[error("unexpected answer from vCenter: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// An answer was larger than the client accepts; reading stopped at the
    /// limit.
    #[error("vCenter's answer exceeded the limit of {limit_bytes} bytes")]
    AnswerTooLarge {
        /// The limit in force (`SoapOptions::max_answer_bytes` in the SOAP
        /// client).
        limit_bytes: u64,
    },
    /// The VM does not exist (any more). For power-off and destroy this
    /// means the work is already done: whoever acted before removed it.
    #[error("VM {vmware_vm_id} no longer exists in vCenter")]
    VmGone {
        /// The managed-object id that was looked up.
        vmware_vm_id: String,
    },
    /// The VM does not carry the dvmm VM id the caller acts for (another
    /// id, or none: dvmm did not create it). It was left untouched.
    #[error(
        "VM {vmware_vm_id} was not created by dvmm for this VM (its dvmm.vmId does not match); it was left untouched"
    )]
    NotOurs {
        /// The managed-object id.
        vmware_vm_id: String,
    },
    /// vCenter recorded a failed guest customization (a `CustomizationFailed`
    /// event or one of its subtypes) for the VM: the template lacks what
    /// customization needs. Retrying helps only once the template is fixed.
    #[error("guest customization failed ({event}){}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    CustomizationFailed {
        /// The event type, e.g. `CustomizationLinuxIdentityFailed`.
        event: String,
        /// vCenter's reason (`reason`, else the event's message), when it
        /// gives one.
        reason: Option<String>,
    },
    /// vCenter recorded no customization outcome in time.
    #[error("guest customization {} within {waited_secs} s", if *started { "started but did not finish" } else { "did not start" })]
    CustomizationTimeout {
        /// Whether vCenter recorded that customization started.
        started: bool,
        /// How long was waited after power-on.
        waited_secs: u64,
    },
}

impl VsphereError {
    /// Whether trying the same operation again later may succeed. Besides
    /// the transport and session failures, a task refused because the
    /// object is busy (`TaskInProgress`, `ConcurrentAccess`: typically a
    /// task of a caller that died is still running on the VM) is worth
    /// trying again once it has finished.
    pub fn is_retryable(&self) -> bool {
        match self {
            VsphereError::NotAuthenticated
            | VsphereError::Timeout { .. }
            | VsphereError::Transport { .. }
            | VsphereError::CircuitOpen { .. } => true,
            VsphereError::TaskFailed { fault, .. } => {
                matches!(fault.as_str(), "TaskInProgress" | "ConcurrentAccess")
            }
            _ => false,
        }
    }

    /// Whether the failure says the vCenter itself cannot be used right now
    /// (unreachable, connection broken, no answer in time, a proxy's
    /// 502/503/504, circuit breaker open), as opposed to a failure about the
    /// request. Work that meets it should wait for the endpoint rather than
    /// use up its attempts.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VsphereError::Transport { .. } | VsphereError::CircuitOpen { .. }
        )
    }

    /// A stable machine-readable code, as recorded in failure events.
    pub fn code(&self) -> &'static str {
        match self {
            VsphereError::InvalidLogin { .. } => "InvalidLogin",
            VsphereError::NotAuthenticated => "NotAuthenticated",
            VsphereError::DuplicateName { .. } => "DuplicateName",
            VsphereError::NotFound { .. } => "NotFound",
            VsphereError::InvalidPowerState { .. } => "InvalidPowerState",
            VsphereError::InsufficientResources { .. } => "InsufficientResources",
            VsphereError::TaskFailed { .. } => "TaskFailed",
            VsphereError::Timeout { .. } => "Timeout",
            VsphereError::Transport { .. } => "Transport",
            VsphereError::Tls { .. } => "Tls",
            VsphereError::CircuitOpen { .. } => "CircuitOpen",
            VsphereError::Protocol { .. } => "Protocol",
            VsphereError::AnswerTooLarge { .. } => "AnswerTooLarge",
            VsphereError::VmGone { .. } => "VmGone",
            VsphereError::NotOurs { .. } => "NotOurs",
            VsphereError::CustomizationFailed { .. } => "CustomizationFailed",
            VsphereError::CustomizationTimeout { .. } => "CustomizationTimeout",
        }
    }
}

/// How [`VspherePort::power_off_vm`] stops a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOffMode {
    /// Cut the power at once (`PowerOffVM_Task`).
    Hard,
    /// Ask the guest OS to shut down (`ShutdownGuest`) and wait up to
    /// `timeout` for the VM to be off; a guest that cannot be asked (no
    /// VMware Tools) or is not off in time is powered off hard.
    Guest {
        /// How long the guest gets.
        timeout: Duration,
    },
}

/// What [`VspherePort::power_off_vm`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOffOutcome {
    /// The VM was already powered off; nothing was sent.
    AlreadyOff,
    /// The guest shut itself down in time.
    GuestShutdown,
    /// The VM was powered off hard (asked to, or after the guest did not
    /// shut down).
    Hard,
}

/// A stage of [`VspherePort::create_vm_reporting`] that the user is told
/// about while the call runs (it can take minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProvisioningProgress {
    /// The VM is powered on with its customization specification applied,
    /// and the port now waits for the guest's customization outcome
    /// (reported only when `spec.customization_timeout` is not zero).
    CustomizingGuest,
}

/// Where [`VspherePort::create_vm_reporting`] reports progress. It is
/// called from inside the port's future, so it must return at once (hand
/// the report over, e.g. into a channel; do not block or wait).
pub type ProgressReporter<'a> = &'a (dyn Fn(ProvisioningProgress) + Send + Sync);

/// Creates and inspects VMs in vSphere.
///
/// `create_vm` is idempotent per `spec.vm_id`: when a VM named `spec.name`
/// already exists in `spec.folder_path` and carries `spec.vm_id`, it is
/// adopted (finished and returned) instead of cloned again; when it carries
/// another id or none, the result is [`VsphereError::DuplicateName`].
///
/// `power_off_vm` and `destroy_vm` act only on a VM whose extraConfig
/// `dvmm.vmId` equals `owner`: any other VM is [`VsphereError::NotOurs`]
/// and is not touched. A VM that does not exist is
/// [`VsphereError::VmGone`], which a caller removing the VM can count as
/// done.
pub trait VspherePort: Send + Sync {
    /// Clones, configures, customizes and powers on the VM, then waits up to
    /// `spec.ip_wait_timeout` for its IP. A missing IP is not an error: the
    /// result has no IP and a warning.
    fn create_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send;

    /// [`VspherePort::create_vm`], reporting its stages to `progress` as it
    /// reaches them (the service writes them on the request's timeline, e.g.
    /// "Customizing guest"). A stage may be reported again when a resumed
    /// call passes it again. The default reports nothing: an adapter that
    /// does not override it still provisions, only without progress.
    fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        let _ = progress;
        self.create_vm(spec)
    }

    /// Live guest facts of a VM, with its power state.
    fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send;

    /// Powers the VM off; a VM already off is fine. A suspended VM is
    /// powered off hard in either mode (there is no running guest to ask).
    fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> impl Future<Output = Result<PowerOffOutcome, VsphereError>> + Send;

    /// Destroys a powered-off VM and its disks (a VM still on is
    /// [`VsphereError::InvalidPowerState`]).
    fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> impl Future<Output = Result<(), VsphereError>> + Send;

    /// The VM named `spec.name` in `spec.folder_path`, if any.
    fn find_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<Option<VmGuestInfo>, VsphereError>> + Send;
}

impl<T: VspherePort + ?Sized> VspherePort for Arc<T> {
    fn create_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        (**self).create_vm(spec)
    }

    fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        (**self).create_vm_reporting(spec, progress)
    }

    fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send {
        (**self).get_vm(endpoint, id)
    }

    fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> impl Future<Output = Result<PowerOffOutcome, VsphereError>> + Send {
        (**self).power_off_vm(endpoint, id, owner, mode)
    }

    fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> impl Future<Output = Result<(), VsphereError>> + Send {
        (**self).destroy_vm(endpoint, id, owner)
    }

    fn find_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<Option<VmGuestInfo>, VsphereError>> + Send {
        (**self).find_vm(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::VsphereError;

    #[test]
    fn a_busy_object_is_retryable_and_other_task_faults_are_not() {
        let task = |fault: &str| VsphereError::TaskFailed {
            fault: fault.into(),
            message: String::new(),
        };
        assert!(task("TaskInProgress").is_retryable());
        assert!(task("ConcurrentAccess").is_retryable());
        assert!(!task("CustomizationFailed").is_retryable());
        assert!(!task("TaskInProgress").is_unavailable());
    }
}
