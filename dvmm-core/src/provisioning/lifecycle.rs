//! The lifecycle after the request: removing what a failed provisioning
//! left, retrying a failed request, decommissioning a VM and reading its
//! live status.
//!
//! Every command that calls vSphere holds the request's claim meanwhile
//! (the one provisioning takes), so it can never run beside a provisioning
//! of the same VM. Each is crash-safe in the same way: it looks at what the
//! streams say first, vSphere calls are safe to repeat (a power-off of a VM
//! that is off, a destroy of a VM that is gone), events are appended with
//! the expected version, and timeline entries are keyed by their event, so a
//! rerun finishes the job without doubling anything.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, info, info_span, warn};

use crate::clock::{Clock, IdGenerator};
use crate::config::{OnFailure, TenantConfig};
use crate::event::EventMetadata;
use crate::ids::{TenantId, UserId, VmId, VmRequestId, VmwareVmId};
use crate::ports::{
    ClaimAttempt, EventStore, PowerOffMode, PowerOffOutcome, TimelineSink, VsphereError,
    VspherePort,
};
use crate::spec::{PowerState, VmSpec};
use crate::timeline::{TimelineEntry, TimelineEntryType, TimelineFields};
use crate::vm::{Vm, VmCommand, VmEvent, VmStatus};
use crate::vm_request::{VmRequest, VmRequestCommand, VmRequestStatus};

use super::aggregates::{request_stream, vm_stream};
use super::claims::{ClaimSource, ClaimState, after};
use super::flow::recorded_spec;
use super::{ProvisioningService, ServiceError};

/// How long a decommissioned VM's guest gets to shut down before its power
/// is cut.
pub const GUEST_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// The timeline text of a removed partial VM.
pub const PARTIAL_REMOVED_DETAILS: &str = "Provisioning failed – partial VM removed";

/// What [`ProvisioningService::cleanup_failed`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanupOutcome {
    /// The partial VM was powered off and destroyed.
    Removed(VmwareVmId),
    /// The failed provisioning had left no VM of its own (it failed before
    /// cloning, or the VM was already gone); that is recorded now.
    NothingLeft,
    /// Done before: nothing to do.
    AlreadyDone,
    /// The tenant keeps failed VMs (`on_failure: keep`); nothing was
    /// touched.
    Kept,
    /// The request's latest attempt did not fail (or has not ended): there
    /// is nothing to clean up.
    NotFailed,
}

/// What [`ProvisioningService::decommission`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecommissionOutcome {
    /// The VM was removed from vCenter (or found gone) and `VmDeleted` was
    /// recorded now.
    Deleted {
        /// How the VM was stopped; `None` when it was already gone.
        power_off: Option<PowerOffOutcome>,
    },
    /// It was deleted before: nothing to do.
    AlreadyDeleted,
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// Runs `work` under the request's claim (see the module docs). A claim
    /// held by another caller is [`ServiceError::Claimed`]. With a shared
    /// claim, the request's job is done afterwards when `finished` says so
    /// and the request is not open (`Approved`, `Provisioning`); else it
    /// goes back to the queue, for a runner to pick up.
    async fn claimed<R, F, Fut>(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
        finished: impl Fn(&Result<R, ServiceError>) -> bool,
        work: F,
    ) -> Result<R, ServiceError>
    where
        F: FnOnce(Arc<ClaimState>) -> Fut,
        Fut: Future<Output = Result<R, ServiceError>>,
    {
        match &self.claims {
            ClaimSource::Process(claims) => {
                let _token =
                    claims
                        .acquire(request_id, holder)
                        .map_err(|other| ServiceError::Claimed {
                            request_id,
                            holder: other,
                            until: None,
                        })?;
                work(Arc::new(ClaimState::new(holder, None))).await
            }
            ClaimSource::Shared { port, sleep, lease } => {
                let started = self.clock.now();
                let fresh = match port.acquire(tenant, request_id, holder, *lease).await? {
                    ClaimAttempt::Acquired { .. } => true,
                    ClaimAttempt::AlreadyHeld { .. } => false,
                    ClaimAttempt::HeldBy(other) => {
                        return Err(ServiceError::Claimed {
                            request_id,
                            holder: other.holder,
                            until: Some(other.until),
                        });
                    }
                };
                let claim = Arc::new(ClaimState::new(holder, Some(after(started, *lease))));
                let work = work(claim.clone());
                let outcome = if fresh {
                    let renew = self.renew_claim(port.as_ref(), sleep, *lease, &claim, request_id);
                    let mut work = std::pin::pin!(work);
                    let renew = std::pin::pin!(renew);
                    match futures::future::select(work.as_mut(), renew).await {
                        futures::future::Either::Left((outcome, _)) => outcome,
                        futures::future::Either::Right(((), _)) => work.await,
                    }
                } else {
                    work.await
                };
                if fresh {
                    // A request left open (retried now, or by someone else
                    // meanwhile) goes back to the queue for a runner.
                    let open = match self
                        .load::<VmRequest>(tenant, &request_stream(request_id))
                        .await
                    {
                        Ok(loaded) => loaded.state.is_none_or(|r| {
                            matches!(
                                r.status,
                                VmRequestStatus::Approved | VmRequestStatus::Provisioning
                            )
                        }),
                        // Unknown: a runner that claims it finds out.
                        Err(_) => true,
                    };
                    if let Err(error) = port
                        .release_claim(holder, request_id, finished(&outcome) && !open)
                        .await
                    {
                        warn!(%error, "could not give the claim back; it lapses by itself");
                    }
                }
                outcome
            }
        }
    }

    /// The endpoint and spec a VM was built with (the recorded placement,
    /// credentials from the current configuration).
    fn spec_of(
        &self,
        config: &TenantConfig,
        request: &VmRequest,
        vm: &Vm,
    ) -> Result<VmSpec, ServiceError> {
        let fresh = VmSpec::for_request(
            config,
            request.id,
            vm.id,
            &request.vm_name,
            &request.project_prefix,
            vm.resources,
        );
        recorded_spec(config, vm, fresh)
    }

    /// The timeline entries of VM-stream events (idempotent: keyed by
    /// event), so a rerun fills in what a crash left out.
    async fn record_vm_timeline(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        events: &[(EventMetadata, VmEvent)],
    ) -> Result<(), ServiceError> {
        for (metadata, event) in events {
            let mut fields = TimelineFields::default();
            let (entry_type, details) = match event {
                VmEvent::VmPartialRemoved(e) if e.vmware_vm_id.is_some() => (
                    TimelineEntryType::PartialVmRemoved,
                    PARTIAL_REMOVED_DETAILS.to_owned(),
                ),
                VmEvent::VmDeleted(e) => {
                    fields.actor = Some(metadata.user_id);
                    fields.reason = e.reason.clone();
                    (
                        TimelineEntryType::VmDeleted,
                        match &e.reason {
                            Some(reason) if !reason.trim().is_empty() => {
                                format!("VM deleted: {reason}")
                            }
                            _ => "VM deleted".to_owned(),
                        },
                    )
                }
                VmEvent::VmPowerStateObserved(e) => (
                    TimelineEntryType::StatusChanged,
                    match e.power_state {
                        PowerState::PoweredOn => "VM running".to_owned(),
                        PowerState::PoweredOff => "VM stopped".to_owned(),
                        PowerState::Suspended => "VM stopped (suspended)".to_owned(),
                    },
                ),
                _ => continue,
            };
            self.timeline
                .record(TimelineEntry {
                    event_id: metadata.event_id,
                    tenant_id: tenant,
                    request_id,
                    entry_type,
                    details,
                    occurred_at: metadata.occurred_at,
                    fields,
                })
                .await?;
        }
        Ok(())
    }

    /// Powers off and destroys what the request's failed provisioning left
    /// on vCenter (a clone that failed customization, say), unless the
    /// tenant keeps failed VMs (`on_failure: keep`). The failure record is
    /// written before and stays as it is; this adds `VmPartialRemoved` to
    /// the VM stream and "Provisioning failed – partial VM removed" to the
    /// timeline. Only a VM carrying the failed VM's dvmm id is touched.
    /// The runner calls it after every failure and retries it until it
    /// succeeds; a host may call it too.
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::Claimed`],
    /// [`ServiceError::Vsphere`] (nothing recorded: call again), or a store
    /// failure.
    pub async fn cleanup_failed(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<CleanupOutcome, ServiceError> {
        let holder = self.holder.clone();
        self.cleanup_failed_as(tenant, request_id, &holder).await
    }

    /// [`ProvisioningService::cleanup_failed`] under `holder`'s claim (a
    /// runner's worker, whose lease on the job is the claim).
    ///
    /// # Errors
    /// As [`ProvisioningService::cleanup_failed`].
    pub async fn cleanup_failed_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
    ) -> Result<CleanupOutcome, ServiceError> {
        let span = info_span!("cleanup_failed", tenant = %tenant, request_id = %request_id);
        async {
            // Most calls find nothing to do: answer those without a claim.
            match self.cleanup_target(tenant, request_id).await? {
                Ok(_) => {}
                Err(done) => return Ok(done),
            }
            self.claimed(
                tenant,
                request_id,
                holder,
                Result::is_ok,
                |claim| async move { self.cleanup_claimed(tenant, request_id, &claim).await },
            )
            .await
        }
        .instrument(span)
        .await
    }

    /// The request and its failed VM when there is cleanup to do (or to
    /// finish), else the answer.
    async fn cleanup_target(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Result<(VmRequest, Vm), CleanupOutcome>, ServiceError> {
        let request = self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?
            .state
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        let (VmRequestStatus::Failed, Some(vm_id)) = (request.status, request.vm_id) else {
            return Ok(Err(CleanupOutcome::NotFailed));
        };
        let loaded = self.load::<Vm>(tenant, &vm_stream(vm_id)).await?;
        // A failure recorded before the VM stream was started left nothing.
        let Some(vm) = loaded.state else {
            return Ok(Err(CleanupOutcome::NotFailed));
        };
        if vm.status != VmStatus::Failed {
            return Ok(Err(CleanupOutcome::NotFailed));
        }
        match &vm.partial_removed {
            Some(None) => return Ok(Err(CleanupOutcome::AlreadyDone)),
            // Recorded before its removal: a crash may have come between,
            // so the removal is made sure of (a VM gone answers at once).
            Some(Some(_)) => {}
            None if self.tenant(tenant)?.on_failure == OnFailure::Keep => {
                return Ok(Err(CleanupOutcome::Kept));
            }
            None => {}
        }
        Ok(Ok((request, vm)))
    }

    /// Powers the VM off and destroys it; a VM already gone is fine
    /// (`None`).
    #[allow(clippy::too_many_arguments)]
    async fn remove_vm(
        &self,
        endpoint: &crate::config::VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        claim: &ClaimState,
        request_id: VmRequestId,
        mode: PowerOffMode,
    ) -> Result<Option<PowerOffOutcome>, ServiceError> {
        self.check_claim(claim, request_id)?;
        let outcome = match self.vsphere.power_off_vm(endpoint, id, owner, mode).await {
            Ok(outcome) => outcome,
            Err(VsphereError::VmGone { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.check_claim(claim, request_id)?;
        match self.vsphere.destroy_vm(endpoint, id, owner).await {
            Ok(()) | Err(VsphereError::VmGone { .. }) => Ok(Some(outcome)),
            Err(e) => Err(e.into()),
        }
    }

    async fn cleanup_claimed(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        claim: &ClaimState,
    ) -> Result<CleanupOutcome, ServiceError> {
        // Looked at again under the claim: another caller may have done it.
        let (request, vm) = match self.cleanup_target(tenant, request_id).await? {
            Ok(target) => target,
            Err(done) => return Ok(done),
        };
        let config = self.tenant(tenant)?.clone();
        let spec = self.spec_of(&config, &request, &vm)?;
        let stream = vm_stream(vm.id);
        if let Some(Some(id)) = &vm.partial_removed {
            self.remove_vm(
                &spec.endpoint,
                id,
                vm.id,
                claim,
                request_id,
                PowerOffMode::Hard,
            )
            .await?;
            let loaded = self.load::<Vm>(tenant, &stream).await?;
            self.record_vm_timeline(tenant, request_id, &loaded.events)
                .await?;
            return Ok(CleanupOutcome::AlreadyDone);
        }
        self.check_claim(claim, request_id)?;
        let found = self.vsphere.find_vm(&spec).await?;
        // A VM of that name that is not this attempt's (the failure may
        // have been `DuplicateName`) is not ours to remove.
        let ours = found
            .filter(|info| info.dvmm_vm_id == Some(vm.id))
            .map(|info| info.vmware_vm_id);
        // Recorded before the removal, so that a crash in between leaves
        // the id for the rerun; its timeline entry follows the removal.
        let actor = self.actor(tenant, request.decided_by.unwrap_or(request.requested_by));
        let command = VmCommand::RecordPartialRemoved {
            vmware_vm_id: ours.clone(),
        };
        let (_, written) = self.execute::<Vm>(actor, &stream, &command).await?;
        let Some(id) = ours else {
            return Ok(CleanupOutcome::NothingLeft);
        };
        info!(vmware_vm_id = %id, "removing the VM the failed provisioning left");
        self.remove_vm(
            &spec.endpoint,
            &id,
            vm.id,
            claim,
            request_id,
            PowerOffMode::Hard,
        )
        .await?;
        self.record_vm_timeline(tenant, request_id, &written)
            .await?;
        Ok(CleanupOutcome::Removed(id))
    }

    /// Sends a `Failed` request back through provisioning as a new attempt
    /// with a new VM id: records `VmRequestRetried` (the request is
    /// `Approved` again) and "Retry requested by …" on the timeline; the
    /// runner picks it up (or a host calls `provision`). What the failed
    /// attempt left on vCenter is removed first when the tenant does not
    /// keep failed VMs, so that the new attempt does not meet it. Returns
    /// the new attempt's number.
    ///
    /// # Errors
    /// [`ServiceError::NotRetryable`] for any status but `Failed` (a second
    /// retry of the same failure included), [`ServiceError::Claimed`],
    /// [`ServiceError::Vsphere`] when the cleanup failed (nothing recorded:
    /// call again), or a store failure.
    pub async fn retry(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        by: UserId,
    ) -> Result<u32, ServiceError> {
        let span = info_span!("retry", tenant = %tenant, request_id = %request_id);
        let holder = self.holder.clone();
        async {
            self.open_failed(tenant, request_id).await?;
            // The job goes back to the queue once the retry is recorded
            // (the request is open again).
            self.claimed(tenant, request_id, &holder, |_| true, |claim| async move {
                self.open_failed(tenant, request_id).await?;
                match self.cleanup_claimed(tenant, request_id, &claim).await? {
                    CleanupOutcome::Removed(id) => info!(vmware_vm_id = %id, "removed the failed attempt's VM before retrying"),
                    other => info!(?other, "nothing of the failed attempt to remove"),
                }
                let actor = self.actor(tenant, by);
                let (request, written) = self
                    .execute::<VmRequest>(actor, &request_stream(request_id), &VmRequestCommand::Retry { by })
                    .await
                    .map_err(|e| match e {
                        ServiceError::Domain(crate::error::DomainError::InvalidTransition { .. }) => {
                            ServiceError::NotRetryable { request_id, status: VmRequestStatus::Approved }
                        }
                        other => other,
                    })?;
                self.record_request_timeline(tenant, request_id, &written).await?;
                info!(attempt = request.attempt, "retry recorded");
                Ok(request.attempt)
            })
            .await
        }
        .instrument(span)
        .await
    }

    /// The request when it is `Failed`; else [`ServiceError::NotRetryable`]
    /// (after filling in the timeline, which a crash may have cut short).
    async fn open_failed(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<VmRequest, ServiceError> {
        let loaded = self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?;
        let request = loaded
            .state
            .clone()
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        if request.status != VmRequestStatus::Failed {
            self.record_request_timeline(tenant, request_id, &loaded)
                .await?;
            return Err(ServiceError::NotRetryable {
                request_id,
                status: request.status,
            });
        }
        Ok(request)
    }

    /// Removes a VM: asks its guest to shut down (cutting the power after
    /// [`GUEST_SHUTDOWN_GRACE`]), destroys it, and records `VmDeleted` and
    /// "VM deleted" on the timeline. A VM already gone from vCenter counts
    /// as deleted; a rerun after a crash finishes the job, and a call for a
    /// VM already deleted does nothing. Only a VM carrying this VM's dvmm id
    /// is touched. A failed VM may be decommissioned too (its partial VM, if
    /// any, is removed).
    ///
    /// # Errors
    /// [`ServiceError::VmNotFound`], [`ServiceError::VmStillProvisioning`],
    /// [`ServiceError::Claimed`] (the request is being provisioned or
    /// worked on right now), [`ServiceError::Domain`] for an over-long
    /// reason, [`ServiceError::Vsphere`] (nothing recorded: call again), or
    /// a store failure.
    pub async fn decommission(
        &self,
        tenant: TenantId,
        vm_id: VmId,
        by: UserId,
        reason: Option<String>,
    ) -> Result<DecommissionOutcome, ServiceError> {
        let span = info_span!("decommission", tenant = %tenant, vm_id = %vm_id);
        let holder = self.holder.clone();
        async {
            if let Some(reason) = &reason {
                crate::error::bounded_text("reason", reason)?;
            }
            let vm = match self.open_for_decommission(tenant, vm_id).await? {
                Ok(vm) => vm,
                Err(done) => return Ok(done),
            };
            self.claimed(
                tenant,
                vm.request_id,
                &holder,
                |_| true,
                |claim| {
                    let reason = reason.clone();
                    async move {
                        let vm = match self.open_for_decommission(tenant, vm_id).await? {
                            Ok(vm) => vm,
                            Err(done) => return Ok(done),
                        };
                        let request = self
                            .load::<VmRequest>(tenant, &request_stream(vm.request_id))
                            .await?
                            .state
                            .ok_or(ServiceError::RequestNotFound(vm.request_id))?;
                        let config = self.tenant(tenant)?.clone();
                        let spec = self.spec_of(&config, &request, &vm)?;
                        // A failed VM may have left a partial one, never
                        // recorded: look it up by its place.
                        let target = match &vm.vmware_vm_id {
                            Some(id) => Some(id.clone()),
                            None if vm.partial_removed.is_none() => {
                                self.check_claim(&claim, vm.request_id)?;
                                self.vsphere
                                    .find_vm(&spec)
                                    .await?
                                    .filter(|info| info.dvmm_vm_id == Some(vm.id))
                                    .map(|info| info.vmware_vm_id)
                            }
                            None => None,
                        };
                        let mut power_off = None;
                        if let Some(id) = &target {
                            power_off = self
                                .remove_vm(
                                    &spec.endpoint,
                                    id,
                                    vm.id,
                                    &claim,
                                    vm.request_id,
                                    PowerOffMode::Guest {
                                        timeout: GUEST_SHUTDOWN_GRACE,
                                    },
                                )
                                .await?;
                        }
                        let actor = self.actor(tenant, by);
                        let (_, written) = self
                            .execute::<Vm>(
                                actor,
                                &vm_stream(vm_id),
                                &VmCommand::MarkDeleted { reason },
                            )
                            .await?;
                        self.record_vm_timeline(tenant, vm.request_id, &written)
                            .await?;
                        info!(?power_off, "VM deleted");
                        Ok(DecommissionOutcome::Deleted { power_off })
                    }
                },
            )
            .await
        }
        .instrument(span)
        .await
    }

    /// The VM when it can be decommissioned, `AlreadyDeleted` (with its
    /// timeline filled in) when it was, or the typed refusal.
    async fn open_for_decommission(
        &self,
        tenant: TenantId,
        vm_id: VmId,
    ) -> Result<Result<Vm, DecommissionOutcome>, ServiceError> {
        let loaded = self.load::<Vm>(tenant, &vm_stream(vm_id)).await?;
        let vm = loaded.state.ok_or(ServiceError::VmNotFound(vm_id))?;
        match vm.status {
            VmStatus::Deleted => {
                self.record_vm_timeline(tenant, vm.request_id, &loaded.events)
                    .await?;
                Ok(Err(DecommissionOutcome::AlreadyDeleted))
            }
            VmStatus::Provisioning => Err(ServiceError::VmStillProvisioning { vm_id }),
            VmStatus::Ready | VmStatus::Running | VmStatus::Stopped | VmStatus::Failed => {
                Ok(Ok(vm))
            }
        }
    }

    /// Reads the VM's power state from vCenter and moves it to `Running` or
    /// `Stopped` (`Ready` becomes `Running` on the first observation that it
    /// is on); an event and a timeline entry ("VM running", "VM stopped")
    /// are written only when the status changes. Returns the VM.
    ///
    /// # Errors
    /// [`ServiceError::VmNotFound`], [`ServiceError::VmNotProvisioned`] for a
    /// VM that is not `Ready`, `Running` or `Stopped`,
    /// [`ServiceError::Claimed`], [`ServiceError::Vsphere`] (`VmGone` when
    /// the VM disappeared from vCenter: decommission it to record that;
    /// `NotOurs` when the id now names a VM that is not this one), or a
    /// store failure.
    pub async fn sync_status(&self, tenant: TenantId, vm_id: VmId) -> Result<Vm, ServiceError> {
        let span = info_span!("sync_status", tenant = %tenant, vm_id = %vm_id);
        let holder = self.holder.clone();
        async {
            let (vm, _) = self.open_for_sync(tenant, vm_id).await?;
            self.claimed(
                tenant,
                vm.request_id,
                &holder,
                |_| true,
                |claim| async move {
                    let (vm, vmware_vm_id) = self.open_for_sync(tenant, vm_id).await?;
                    let request = self
                        .load::<VmRequest>(tenant, &request_stream(vm.request_id))
                        .await?
                        .state
                        .ok_or(ServiceError::RequestNotFound(vm.request_id))?;
                    let config = self.tenant(tenant)?.clone();
                    let spec = self.spec_of(&config, &request, &vm)?;
                    self.check_claim(&claim, vm.request_id)?;
                    let info = self.vsphere.get_vm(&spec.endpoint, &vmware_vm_id).await?;
                    if info.dvmm_vm_id != Some(vm.id) {
                        return Err(VsphereError::NotOurs {
                            vmware_vm_id: vmware_vm_id.to_string(),
                        }
                        .into());
                    }
                    let actor =
                        self.actor(tenant, request.decided_by.unwrap_or(request.requested_by));
                    let (vm, written) = self
                        .execute::<Vm>(
                            actor,
                            &vm_stream(vm_id),
                            &VmCommand::ObservePowerState {
                                power_state: info.power_state,
                            },
                        )
                        .await?;
                    self.record_vm_timeline(tenant, vm.request_id, &written)
                        .await?;
                    Ok(vm)
                },
            )
            .await
        }
        .instrument(span)
        .await
    }

    async fn open_for_sync(
        &self,
        tenant: TenantId,
        vm_id: VmId,
    ) -> Result<(Vm, VmwareVmId), ServiceError> {
        let loaded = self.load::<Vm>(tenant, &vm_stream(vm_id)).await?;
        let vm = loaded.state.ok_or(ServiceError::VmNotFound(vm_id))?;
        // Fills in a status entry a crash may have left out.
        self.record_vm_timeline(tenant, vm.request_id, &loaded.events)
            .await?;
        match (vm.status, vm.vmware_vm_id.clone()) {
            (VmStatus::Ready | VmStatus::Running | VmStatus::Stopped, Some(id)) => Ok((vm, id)),
            (status, _) => Err(ServiceError::VmNotProvisioned { vm_id, status }),
        }
    }
}
