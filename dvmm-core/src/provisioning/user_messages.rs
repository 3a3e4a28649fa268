//! What users read about failures: messages they can act on, naming no
//! host, URL or credential.

use crate::ports::VsphereError;
use crate::spec::VmSpec;

/// A time as users read it in messages, with the date: a wait can outlast
/// midnight.
pub(super) fn utc_minute(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A failure message a user (or their platform team) can act on. It names
/// no host, URL or credential: vCenter's own text is kept only where it
/// describes the request (capacity, task faults), and the detail of
/// connection problems goes to the log instead.
pub fn user_message(error: &VsphereError, spec: &VmSpec) -> String {
    match error {
        VsphereError::NotFound { kind, name } => format!(
            "the {kind} {name:?} configured for this tenant does not exist in vCenter; ask the platform team to fix the tenant configuration"
        ),
        VsphereError::DuplicateName { name, location } => format!(
            "a VM named {name:?} that dvmm did not create already exists in folder {location:?}; choose another name"
        ),
        VsphereError::InsufficientResources { message } => format!(
            "not enough capacity for {} vCPU / {} MiB / {} GiB ({message}); choose a smaller size or ask the platform team for capacity",
            spec.resources.cpu, spec.resources.memory_mib, spec.resources.disk_gib
        ),
        VsphereError::InvalidLogin { .. } => {
            "vCenter refused dvmm's credentials for this tenant; ask the platform team to update them".into()
        }
        VsphereError::NotAuthenticated => {
            "vCenter ended dvmm's session and a new login did not take; ask the platform team to check the tenant's credentials".into()
        }
        VsphereError::Tls { .. } => {
            "vCenter's certificate was not trusted; ask the platform team to check the tenant's TLS settings".into()
        }
        VsphereError::Transport { .. } | VsphereError::CircuitOpen { .. } => {
            "vCenter could not be reached; this is temporary: retrying later may help".into()
        }
        VsphereError::Timeout { operation } => {
            format!("vCenter did not finish {operation} in time")
        }
        VsphereError::InvalidPowerState { message } => {
            format!("the VM was in the wrong power state: {message}")
        }
        VsphereError::TaskFailed { fault, message } => {
            format!("vCenter reported {fault}: {message}")
        }
        VsphereError::Protocol { .. } => {
            "vCenter answered something dvmm could not understand; ask the platform team to check the vCenter endpoint".into()
        }
        VsphereError::AnswerTooLarge { limit_bytes } => format!(
            "vCenter's answer was larger than the {limit_bytes}-byte limit; ask the platform team to check the vCenter endpoint"
        ),
        VsphereError::VmGone { .. } => "the VM no longer exists in vCenter".into(),
        VsphereError::NotOurs { .. } => {
            "a VM that dvmm did not create for this request is in the way; it was left untouched: ask the platform team".into()
        }
        VsphereError::CustomizationFailed { event, reason } => format!(
            "guest customization of the VM failed ({event}{}); ask the platform team to check the template {:?}: VMware Tools installed and running, and the guest's customization prerequisites (e.g. Perl and open-vm-tools' deployPkg plugin on Linux, cloud-init not disabling it); fix the template, then retry",
            reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default(),
            spec.template
        ),
        VsphereError::CustomizationTimeout { started: false, waited_secs } => format!(
            "guest customization never started within {waited_secs} s of power-on; ask the platform team to check that the template {:?} boots and runs VMware Tools, then retry",
            spec.template
        ),
        VsphereError::CustomizationTimeout { started: true, waited_secs } => format!(
            "guest customization started but did not finish within {waited_secs} s; ask the platform team to check the guest's customization prerequisites in the template {:?} (or raise timeouts.customization_secs), then retry",
            spec.template
        ),
    }
}
