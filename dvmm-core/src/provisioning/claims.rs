//! The request's provisioning claim: taken before any vSphere call, renewed
//! while the call works when it is shared with other processes, and given
//! back when the call ends, so that exactly one caller provisions a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tracing::{info, warn};

use crate::clock::{Clock, IdGenerator};
use crate::ids::{TenantId, VmRequestId};
use crate::ports::{ClaimAttempt, EventStore, RequestClaims, TimelineSink, VspherePort};
use crate::runner::Timer;
use crate::vm_request::{VmRequest, VmRequestStatus};

use super::aggregates::request_stream;
use super::flow::{Mode, skip_reason};
use super::{ProvisionOutcome, ProvisioningService, ServiceError};

pub(super) type Sleeper = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// Where the service takes a request's claim before calling vSphere.
pub(super) enum ClaimSource {
    /// Only this process provisions: claims live in memory and end with the
    /// call that holds them (so they cannot outlive a crash).
    Process(Arc<ProcessClaims>),
    /// Shared with other processes; renewed every quarter lease while the
    /// call works.
    Shared {
        port: Arc<dyn RequestClaims>,
        sleep: Sleeper,
        lease: Duration,
    },
}

/// In-process claims: a claim is free again as soon as the call that holds
/// it ends, however it ends (its token is dropped).
#[derive(Default)]
pub(super) struct ProcessClaims {
    by_request: Mutex<HashMap<VmRequestId, (String, Weak<()>)>>,
}

impl ProcessClaims {
    pub(super) fn acquire(&self, request_id: VmRequestId, holder: &str) -> Result<Arc<()>, String> {
        let mut map = self.by_request.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, token)) = map.get(&request_id)
            && token.strong_count() > 0
        {
            return Err(other.clone());
        }
        let token = Arc::new(());
        map.insert(request_id, (holder.to_owned(), Arc::downgrade(&token)));
        // Claims of finished calls are dropped as others are taken.
        map.retain(|_, (_, token)| token.strong_count() > 0);
        Ok(token)
    }
}

/// A claim the current call holds: valid until it lapses or a renewal
/// finds it taken over.
pub(super) struct ClaimState {
    holder: String,
    lost: AtomicBool,
    /// When it lapses, on the service's clock; `None` when it cannot lapse
    /// while the call runs (in-process claims).
    until: Mutex<Option<DateTime<Utc>>>,
}

impl ClaimState {
    pub(super) fn new(holder: &str, until: Option<DateTime<Utc>>) -> Self {
        Self {
            holder: holder.to_owned(),
            lost: AtomicBool::new(false),
            until: Mutex::new(until),
        }
    }

    pub(super) fn until(&self) -> Option<DateTime<Utc>> {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn extend(&self, until: DateTime<Utc>) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    pub(super) fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    pub(super) fn valid(&self, now: DateTime<Utc>) -> bool {
        !self.lost.load(Ordering::SeqCst) && self.until().is_none_or(|until| now < until)
    }
}

pub(super) fn after(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// Takes requests' claims from `claims`, shared with every other caller
    /// of the deployment (the runner's work queue: `MemoryWorkQueue` within
    /// one process, `PgWorkQueue` across processes), instead of from this
    /// service alone. A claim lasts `lease` unless renewed; calls renew it
    /// every quarter lease through `timer`, so a crashed caller's claim
    /// lapses after at most `lease` and the next caller resumes the request.
    ///
    /// Without this, claims only exclude callers of this one service, which
    /// is right only when no other process provisions the same requests.
    pub fn with_claims<Q, W>(mut self, claims: Q, timer: W, lease: Duration) -> Self
    where
        Q: RequestClaims + 'static,
        W: Timer + 'static,
    {
        let timer = Arc::new(timer);
        self.claims = ClaimSource::Shared {
            port: Arc::new(claims),
            sleep: Arc::new(move |duration| {
                let timer = timer.clone();
                Box::pin(async move { timer.sleep(duration).await })
            }),
            lease: lease.max(Duration::from_millis(4)),
        };
        self
    }

    /// Takes the request's claim, provisions under it (renewing it meanwhile
    /// when it is shared) and gives it back.
    pub(super) async fn provision_inner(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        mode: Mode<'_>,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let started = std::time::Instant::now();
        let outcome = self
            .provision_claiming(tenant, request_id, mode, holder)
            .await;
        record_provisioning(tenant, &outcome, started.elapsed());
        outcome
    }

    async fn provision_claiming(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        mode: Mode<'_>,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        match &self.claims {
            ClaimSource::Process(claims) => {
                // In-process claims cost nothing to take, so the request is
                // read only when another call has it.
                let _token = match claims.acquire(request_id, holder) {
                    Ok(token) => token,
                    Err(other) => {
                        return Ok(match self.open_request(tenant, request_id).await? {
                            Ok(request) => held_elsewhere(&request, &other, None),
                            Err(skipped) => skipped,
                        });
                    }
                };
                let claim = ClaimState::new(holder, None);
                self.provision_claimed(tenant, request_id, mode, &claim)
                    .await
            }
            ClaimSource::Shared { port, sleep, lease } => {
                // A shared claim is a job row: a request that is pending or
                // finished is answered without taking (and so without
                // queueing) anything.
                let request = match self.open_request(tenant, request_id).await? {
                    Ok(request) => request,
                    Err(skipped) => return Ok(skipped),
                };
                let started = self.clock.now();
                let fresh = match port.acquire(tenant, request_id, holder, *lease).await? {
                    ClaimAttempt::Acquired { .. } => true,
                    ClaimAttempt::AlreadyHeld { .. } => false,
                    ClaimAttempt::HeldBy(other) => {
                        return Ok(held_elsewhere(&request, &other.holder, Some(other.until)));
                    }
                };
                let claim = ClaimState::new(holder, Some(after(started, *lease)));
                let work = self.provision_claimed(tenant, request_id, mode, &claim);
                let outcome = if fresh {
                    let renew = self.renew_claim(port.as_ref(), sleep, *lease, &claim, request_id);
                    let mut work = std::pin::pin!(work);
                    let renew = std::pin::pin!(renew);
                    match futures::future::select(work.as_mut(), renew).await {
                        futures::future::Either::Left((outcome, _)) => outcome,
                        // Lost: the work stops at its next check, before
                        // calling vSphere again.
                        futures::future::Either::Right(((), _)) => work.await,
                    }
                } else {
                    // Whoever took the claim first renews and releases it.
                    work.await
                };
                if fresh {
                    let finished = matches!(
                        outcome,
                        Ok(ProvisionOutcome::Ready { .. } | ProvisionOutcome::Failed { .. })
                    );
                    if let Err(error) = port.release_claim(holder, request_id, finished).await {
                        warn!(%error, "could not give the claim back; it lapses by itself");
                    }
                }
                outcome
            }
        }
    }

    /// The request when it is approved or provisioning (work that may call
    /// vSphere), else the answer that nothing is to be done.
    pub(super) async fn open_request(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Result<VmRequest, ProvisionOutcome>, ServiceError> {
        let loaded = self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?;
        let request = loaded
            .state
            .clone()
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        if matches!(
            request.status,
            VmRequestStatus::Approved | VmRequestStatus::Provisioning
        ) {
            return Ok(Ok(request));
        }
        // The timeline must show what the stream says (a crash may have cut
        // it short), as on every other path.
        self.record_request_timeline(tenant, request_id, &loaded)
            .await?;
        let reason = skip_reason(&request);
        info!(status = %request.status, "nothing to provision: {reason}");
        Ok(Err(ProvisionOutcome::Skipped {
            status: request.status,
            reason,
        }))
    }

    /// Renews a shared claim every quarter lease until it is lost (taken
    /// over, or not renewed before it lapsed); never returns otherwise.
    pub(super) async fn renew_claim(
        &self,
        port: &dyn RequestClaims,
        sleep: &Sleeper,
        lease: Duration,
        claim: &ClaimState,
        request_id: VmRequestId,
    ) {
        loop {
            sleep(lease / 4).await;
            let started = self.clock.now();
            match port.renew_claim(&claim.holder, request_id, lease).await {
                Ok(true) => claim.extend(after(started, lease)),
                Ok(false) => {
                    warn!(holder = %claim.holder, "the claim was taken over; stopping before the next vSphere call");
                    claim.lose();
                    return;
                }
                Err(error) if !claim.valid(self.clock.now()) => {
                    warn!(holder = %claim.holder, %error, "the claim lapsed: it could not be renewed in time; stopping before the next vSphere call");
                    claim.lose();
                    return;
                }
                Err(error) => {
                    warn!(holder = %claim.holder, %error, "renewing the claim failed; trying again");
                }
            }
        }
    }

    /// Stops the call unless it still holds the claim: for just before a
    /// vSphere call or recording a failure (the new holder may be about to
    /// adopt the VM).
    pub(super) fn check_claim(
        &self,
        claim: &ClaimState,
        request_id: VmRequestId,
    ) -> Result<(), ServiceError> {
        if claim.valid(self.clock.now()) {
            Ok(())
        } else {
            claim.lose();
            Err(ServiceError::ClaimLost {
                request_id,
                holder: claim.holder.clone(),
            })
        }
    }
}

/// The answer to a caller that finds the request's claim held by another.
pub(super) fn held_elsewhere(
    request: &VmRequest,
    holder: &str,
    until: Option<DateTime<Utc>>,
) -> ProvisionOutcome {
    let until = match until {
        Some(until) => format!(
            "until {} unless renewed",
            until.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => "until its call in this process ends".to_owned(),
    };
    let reason = format!(
        "{holder} holds this request's provisioning claim {until}; if it stops, the next caller resumes the request"
    );
    info!(status = %request.status, "not provisioning: {reason}");
    ProvisionOutcome::Skipped {
        status: request.status,
        reason,
    }
}

/// The provisioning series of [`crate::telemetry`] for one call.
fn record_provisioning(
    tenant: TenantId,
    outcome: &Result<ProvisionOutcome, ServiceError>,
    took: std::time::Duration,
) {
    use crate::telemetry::{PROVISIONING_DURATION, PROVISIONINGS, tenant_labelled};
    let (label, code) = match outcome {
        Ok(ProvisionOutcome::Ready { .. }) => ("ready", None),
        Ok(ProvisionOutcome::Failed { error, .. }) => ("failed", Some(error.code())),
        Ok(ProvisionOutcome::Deferred { error, .. }) => ("deferred", Some(error.code())),
        Ok(ProvisionOutcome::Skipped { .. }) => ("skipped", None),
        Err(_) => ("error", None),
    };
    let mut labels = vec![("outcome", label.to_owned())];
    if tenant_labelled() {
        labels.push(("tenant", tenant.to_string()));
    }
    metrics::histogram!(PROVISIONING_DURATION, &labels).record(took.as_secs_f64());
    if let Some(code) = code {
        labels.push(("error_code", code.to_owned()));
    }
    metrics::counter!(PROVISIONINGS, &labels).increment(1);
}
