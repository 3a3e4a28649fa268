//! Ports: what the domain needs from the outside world. Adapters live in
//! other crates (`dvmm-store-memory`, `dvmm-store-postgres`, `dvmm-vsphere`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
/// A boxed future, as [`RequestClaims`] returns.
pub use futures::future::BoxFuture;

use crate::config::VcenterEndpoint;
use crate::event::{NewEvent, StoredEvent, StreamId};
use crate::ids::{TenantId, VmRequestId, VmwareVmId};
use crate::spec::{VmGuestInfo, VmProvisioningResult, VmSpec};
use crate::timeline::TimelineEntry;

/// Boxed error source kept by adapter errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The events were written; the stream is now at `new_version`.
    Appended {
        /// Stream version after the append.
        new_version: u64,
        /// Global position of the last event written.
        last_position: u64,
    },
    /// These exact events (by event id) were already stored by an earlier
    /// call whose acknowledgement was lost; nothing was written.
    AlreadyApplied {
        /// Current stream version.
        stream_version: u64,
    },
}

/// A persistence port failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the stream is not at the expected version.
    /// Reload and decide again.
    #[error("conflict on stream {stream}: expected version {expected}, found {actual:?}")]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: u64,
        /// What the store has, when known.
        actual: Option<u64>,
    },
    /// The call itself is wrong (e.g. an event of another tenant).
    #[error("invalid append to {stream}: {reason}")]
    InvalidAppend {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error("event store failed to {operation}: {message}")]
    Backend {
        /// What was being done (`append`, `load`, …).
        operation: &'static str,
        /// What went wrong.
        message: String,
        /// Whether trying again may help (connection lost, serialization
        /// failure), as opposed to a broken schema or bad data.
        retryable: bool,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict { .. } => true,
            StoreError::InvalidAppend { .. } => false,
            StoreError::Backend { retryable, .. } => *retryable,
        }
    }
}

/// Append-only event storage with optimistic concurrency, scoped by tenant.
///
/// Contract (checked by `dvmm_core::testing::store_conformance`):
/// - `append` writes all events or none. The stream must be at
///   `expected_version` (0 = the stream does not exist yet), else
///   [`StoreError::Conflict`]. Versions are contiguous from 1.
/// - Re-appending a batch whose event ids are already stored in that stream
///   returns [`AppendOutcome::AlreadyApplied`] and writes nothing.
/// - Every event's `metadata.tenant_id` must equal `tenant`.
/// - `load` returns a stream's events in version order; a stream of another
///   tenant looks like a missing stream (empty).
/// - `read_all` returns the tenant's events with position > `after`, in
///   position order, at most `limit`, and never skips an event that commits
///   later with a lower position.
pub trait EventStore: Send + Sync {
    /// Appends `events` to `stream`.
    fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send;

    /// Loads a stream (empty if it does not exist for this tenant).
    fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;

    /// Reads the tenant's events after global position `after`.
    fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;
}

impl<T: EventStore + ?Sized> EventStore for Arc<T> {
    fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send {
        (**self).append(tenant, stream, expected_version, events)
    }

    fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send {
        (**self).load(tenant, stream)
    }

    fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send {
        (**self).read_all(tenant, after, limit)
    }
}

/// The user-facing request history.
pub trait TimelineSink: Send + Sync {
    /// Records an entry. Idempotent: an entry whose `event_id` is already
    /// recorded is kept once.
    fn record(&self, entry: TimelineEntry) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A request's entries, oldest first.
    fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<Vec<TimelineEntry>, StoreError>> + Send;
}

impl<T: TimelineSink + ?Sized> TimelineSink for Arc<T> {
    fn record(&self, entry: TimelineEntry) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).record(entry)
    }

    fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<Vec<TimelineEntry>, StoreError>> + Send {
        (**self).list(tenant, request_id)
    }
}

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
        }
    }
}

/// Creates and inspects VMs in vSphere.
///
/// `create_vm` is idempotent per `spec.vm_id`: when a VM named `spec.name`
/// already exists in `spec.folder_path` and carries `spec.vm_id`, it is
/// adopted (finished and returned) instead of cloned again; when it carries
/// another id or none, the result is [`VsphereError::DuplicateName`].
pub trait VspherePort: Send + Sync {
    /// Clones, configures, customizes and powers on the VM, then waits up to
    /// `spec.ip_wait_timeout` for its IP. A missing IP is not an error: the
    /// result has no IP and a warning.
    fn create_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send;

    /// Live guest facts of a VM.
    fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send;

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

    fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send {
        (**self).get_vm(endpoint, id)
    }

    fn find_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<Option<VmGuestInfo>, VsphereError>> + Send {
        (**self).find_vm(spec)
    }
}

/// Who holds a request's provisioning claim, and until when (on the claim
/// store's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimHolder {
    /// The holder's name (a runner's worker id, or the name a host gave its
    /// service).
    pub holder: String,
    /// When the claim lapses unless its holder renews it.
    pub until: DateTime<Utc>,
}

/// What [`RequestClaims::acquire`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimAttempt {
    /// The caller holds the claim now, until `until`; it must renew it while
    /// it works and give it back with [`RequestClaims::release_claim`].
    Acquired {
        /// When it lapses unless renewed.
        until: DateTime<Utc>,
    },
    /// The caller already held the claim (a runner calling the service for a
    /// job it leased): it was extended, and whoever took it first keeps
    /// renewing and releasing it.
    AlreadyHeld {
        /// When it lapses unless renewed.
        until: DateTime<Utc>,
    },
    /// Someone else holds it and it has not lapsed.
    HeldBy(ClaimHolder),
}

/// Exclusive, expiring claims on requests: only the holder of a request's
/// claim may call vSphere for it. One store of claims must be shared by
/// every caller of one deployment (runners and hosts calling
/// `provision` directly), which is why the work queues implement it on their
/// job rows: a runner's lease on a job *is* the claim.
///
/// Futures are boxed so a service can hold the port as a trait object.
pub trait RequestClaims: Send + Sync {
    /// Takes the claim for `holder` for `lease` when it is free or has lapsed
    /// (a crashed holder's claim expires), extends it when `holder` already
    /// has it, or says who has it.
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>>;

    /// Extends `holder`'s claim by `lease` from now; `false` when `holder`
    /// no longer has it (it lapsed and another caller took it).
    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives the claim back (only if `holder` has it). `finished` says the
    /// request needs no more work (its outcome is recorded); otherwise it is
    /// left for the next caller at once.
    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl<T: RequestClaims + ?Sized> RequestClaims for Arc<T> {
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>> {
        (**self).acquire(tenant, request_id, holder, lease)
    }

    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).renew_claim(holder, request_id, lease)
    }

    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).release_claim(holder, request_id, finished)
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
