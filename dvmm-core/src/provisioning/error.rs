//! The errors of the service's commands.

use crate::error::DomainError;
use crate::event::{EventDecodeError, StreamId};
use crate::ids::{TenantId, VmId, VmRequestId};
use crate::ports::{StoreError, VsphereError};
use crate::spec::NameError;
use crate::vm::VmStatus;
use crate::vm_request::VmRequestStatus;

use super::aggregates::MAX_CONFLICT_RETRIES;

/// A service command failed. Nothing half-done is left behind: each append is
/// atomic and a rerun finishes what a failed call started.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The aggregate refused the command.
    #[error(transparent)]
    Domain(DomainError),
    /// The requested VM name breaks the naming rules. [`NameError::part`]
    /// says which part is wrong (the project prefix or the requested name),
    /// so a form can mark that field without reading the message.
    #[error(transparent)]
    InvalidName(NameError),
    /// The request does not exist (for this tenant).
    #[error("VM request {0} was not found")]
    RequestNotFound(VmRequestId),
    /// The VM does not exist (for this tenant).
    #[error("VM {0} was not found")]
    VmNotFound(VmId),
    /// No configuration is registered for the tenant.
    #[error("no configuration is registered for tenant {0}")]
    UnknownTenant(TenantId),
    /// The VM has no vSphere id yet (it is still being provisioned or failed).
    #[error("VM {vm_id} is {status}; it has no vSphere VM to read yet")]
    VmNotProvisioned {
        /// The VM.
        vm_id: VmId,
        /// Its status.
        status: VmStatus,
    },
    /// A persistence port failed.
    #[error("failed to persist: {0}")]
    Store(#[from] StoreError),
    /// A stored event could not be read.
    #[error("failed to read a stored event: {0}")]
    Decode(#[from] EventDecodeError),
    /// vSphere failed outside of provisioning (e.g. refreshing guest info).
    #[error("vSphere call failed: {0}")]
    Vsphere(#[from] VsphereError),
    /// The VM's provisioning started on a vCenter that the tenant's
    /// configuration no longer names, so there are no credentials to finish
    /// it with, or to read it. Nothing is recorded: once that vCenter is
    /// configured again, a rerun resumes.
    #[error(
        "VM {vm_id} lives on a vCenter that this tenant's configuration no longer names; configure that vCenter again to finish or read it"
    )]
    RecordedVcenterNotConfigured {
        /// The VM.
        vm_id: VmId,
    },
    /// A read-model call on a service without a read model.
    #[error("this service has no request read model (ProvisioningService::with_read_model)")]
    NoReadModel,
    /// Other writers kept changing the stream.
    #[error("gave up on {stream} after {MAX_CONFLICT_RETRIES} concurrent-modification retries")]
    TooManyConflicts {
        /// The contended stream.
        stream: StreamId,
    },
    /// The caller's claim on the request lapsed or was taken over while it
    /// worked, so it stopped before calling vSphere again; whoever holds the
    /// claim now carries on.
    #[error(
        "{holder} lost its claim on request {request_id}; it stopped before calling vSphere again"
    )]
    ClaimLost {
        /// The request.
        request_id: VmRequestId,
        /// Who had the claim.
        holder: String,
    },
    /// Another caller holds the request's claim (it is being provisioned or
    /// worked on right now); try again later.
    #[error("{holder} is working on request {request_id} right now; try again later")]
    Claimed {
        /// The request.
        request_id: VmRequestId,
        /// Who holds its claim.
        holder: String,
        /// Until when, unless renewed (`None` for a claim of a call in this
        /// process).
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Only a `Failed` request can be retried.
    #[error("request {request_id} is {status}; only a failed request can be retried")]
    NotRetryable {
        /// The request.
        request_id: VmRequestId,
        /// Its status.
        status: VmRequestStatus,
    },
    /// A VM that is still being provisioned cannot be decommissioned.
    #[error("VM {vm_id} is still being provisioned; decommission it once provisioning has ended")]
    VmStillProvisioning {
        /// The VM.
        vm_id: VmId,
    },
}

impl From<DomainError> for ServiceError {
    /// A bad name becomes [`ServiceError::InvalidName`] wherever the
    /// aggregate refuses it, so callers match one variant for it.
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::InvalidName(name) => ServiceError::InvalidName(name),
            error => ServiceError::Domain(error),
        }
    }
}
