//! Waiting for a request to reach a state, in the shape of kube-runtime's
//! `await_condition`: [`await_request`] resolves once a condition holds (wrap
//! it in your own timeout), [`await_request_for`] takes the timeout itself.
//! Conditions for the usual cases are in [`conditions`].
//!
//! ```
//! # async fn demo<S, V, T, C, I>(
//! #     service: &dvmm::ProvisioningService<S, V, T, C, I>,
//! #     tenant: dvmm::TenantId,
//! #     request: dvmm::VmRequestId,
//! # ) -> Result<(), dvmm::wait::WaitError>
//! # where
//! #     S: dvmm::EventStore, V: dvmm::VspherePort, T: dvmm::TimelineSink,
//! #     C: dvmm::Clock, I: dvmm::IdGenerator,
//! # {
//! use std::time::Duration;
//! use dvmm::wait::{await_request_for, conditions};
//!
//! // The runner provisions in the background; the host waits for the outcome.
//! let request = await_request_for(
//!     service, tenant, request, conditions::is_finished(), Duration::from_secs(900),
//! )
//! .await?;
//! println!("{} ended {}", request.vm_name, request.status);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use dvmm_core::clock::{Clock, IdGenerator};
use dvmm_core::ports::{EventStore, TimelineSink, VspherePort};
use dvmm_core::{
    ProvisioningService, ServiceError, TenantId, VmRequest, VmRequestId, VmRequestStatus,
};

/// The first look comes at once; then the store is read again after 100 ms,
/// doubling up to this.
const MAX_POLL: Duration = Duration::from_secs(2);

/// Why [`await_request_for`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The condition did not hold within the timeout.
    #[error(
        "request {request_id} did not reach the awaited state within {after:?} (last seen: {last})"
    )]
    TimedOut {
        /// The request.
        request_id: VmRequestId,
        /// The timeout.
        after: Duration,
        /// Its status at the last look.
        last: VmRequestStatus,
    },
    /// Reading the request failed, or it does not exist.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Resolves with the request once `condition` holds for it, reading it from
/// the store (at once, then at growing intervals up to 2 s). It never gives
/// up by itself: wrap it in a timeout, or use [`await_request_for`].
///
/// # Errors
/// [`ServiceError::RequestNotFound`] for a request that does not exist, and
/// any store failure.
pub async fn await_request<S, V, T, C, I>(
    service: &ProvisioningService<S, V, T, C, I>,
    tenant: TenantId,
    request_id: VmRequestId,
    condition: impl Fn(&VmRequest) -> bool,
) -> Result<VmRequest, ServiceError>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    let mut last = None;
    watch(service, tenant, request_id, condition, &mut last).await
}

/// [`await_request`] with a timeout.
///
/// # Errors
/// [`WaitError::TimedOut`] (with the status last seen) when `timeout` passes
/// first, [`WaitError::Service`] as [`await_request`].
pub async fn await_request_for<S, V, T, C, I>(
    service: &ProvisioningService<S, V, T, C, I>,
    tenant: TenantId,
    request_id: VmRequestId,
    condition: impl Fn(&VmRequest) -> bool,
    timeout: Duration,
) -> Result<VmRequest, WaitError>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    let mut last = None;
    let outcome = tokio::time::timeout(
        timeout,
        watch(service, tenant, request_id, condition, &mut last),
    )
    .await;
    match outcome {
        Ok(result) => Ok(result?),
        Err(_) => Err(WaitError::TimedOut {
            request_id,
            after: timeout,
            // A timeout before the first read finished: it existed as far as
            // anyone knows, in an unknown state; Pending is the safe guess.
            last: last.unwrap_or(VmRequestStatus::Pending),
        }),
    }
}

async fn watch<S, V, T, C, I>(
    service: &ProvisioningService<S, V, T, C, I>,
    tenant: TenantId,
    request_id: VmRequestId,
    condition: impl Fn(&VmRequest) -> bool,
    last: &mut Option<VmRequestStatus>,
) -> Result<VmRequest, ServiceError>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    let mut pause = Duration::from_millis(100);
    loop {
        let request = service
            .request(tenant, request_id)
            .await?
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        *last = Some(request.status);
        if condition(&request) {
            return Ok(request);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Conditions for [`await_request`].
pub mod conditions {
    use dvmm_core::{VmRequest, VmRequestStatus};

    /// The request has this status.
    pub fn has_status(status: VmRequestStatus) -> impl Fn(&VmRequest) -> bool {
        move |request| request.status == status
    }

    /// The VM is ready.
    pub fn is_ready() -> impl Fn(&VmRequest) -> bool {
        has_status(VmRequestStatus::Ready)
    }

    /// Nothing more will happen without a user: ready, failed, rejected or
    /// cancelled.
    pub fn is_finished() -> impl Fn(&VmRequest) -> bool {
        |request| {
            matches!(
                request.status,
                VmRequestStatus::Ready
                    | VmRequestStatus::Failed
                    | VmRequestStatus::Rejected
                    | VmRequestStatus::Cancelled
            )
        }
    }
}
