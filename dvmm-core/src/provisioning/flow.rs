//! The provisioning flow: start (or resume) a request's provisioning, call
//! vSphere once, and record the outcome on the VM stream, the request and
//! the timeline, reconciling with whatever a concurrent run recorded.

use tracing::{Instrument, debug, info, info_span, warn};

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::config::{TenantConfig, VcenterEndpoint, endpoint_key};
use crate::error::DomainError;
use crate::ids::{CorrelationId, TenantId, VmId, VmRequestId};
use futures::StreamExt;

use crate::ports::{EventStore, ProvisioningProgress, TimelineSink, VsphereError, VspherePort};
use crate::spec::{VmProvisioningResult, VmSpec};
use crate::vm::{Vm, VmCommand, VmProvisioningStarted, VmStatus};
use crate::vm_request::{VmRequest, VmRequestCommand, VmRequestStatus};

use super::aggregates::{Actor, MAX_CONFLICT_RETRIES, Written, request_stream, vm_stream};
use super::claims::ClaimState;
use super::user_messages::{user_message, utc_minute};
use super::{ProvisioningService, ServiceError};

/// The error code of a provisioning given up by [`ProvisioningService::abandon`].
pub const ABANDONED: &str = "Abandoned";

/// What [`ProvisioningService::provision`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionOutcome {
    /// The VM is ready (possibly without an IP yet: see the warning).
    Ready {
        /// dvmm's VM.
        vm_id: VmId,
        /// What vSphere reported.
        result: VmProvisioningResult,
    },
    /// Provisioning failed; the failure is recorded on both streams and the
    /// timeline.
    Failed {
        /// dvmm's VM.
        vm_id: VmId,
        /// Why.
        error: VsphereError,
    },
    /// The attempt stopped without recording a failure: the request stays
    /// in `Provisioning`; run the command again later to resume. Either the
    /// vCenter could not be used ([`VsphereError::is_unavailable`], from
    /// [`ProvisioningService::provision`] too: an outage costs time, never
    /// the request), or a retryable failure about the request itself met
    /// [`ProvisioningService::provision_attempt`].
    Deferred {
        /// dvmm's VM.
        vm_id: VmId,
        /// The retryable failure.
        error: VsphereError,
    },
    /// Nothing was done: the request is not `Approved` (already provisioned,
    /// failed, rejected, …, or being provisioned by another caller right now).
    Skipped {
        /// The request's status.
        status: VmRequestStatus,
        /// Why nothing was done.
        reason: String,
    },
}

/// What a provisioning run does about vSphere.
#[derive(Clone, Copy)]
pub(super) enum Mode<'a> {
    /// Call vSphere and record every failure but an unavailable vCenter.
    Record,
    /// Call vSphere; leave retryable failures unrecorded.
    Defer,
    /// Do not call vSphere: it is known to be unusable with this error.
    Wait(&'a VsphereError),
    /// Do not call vSphere: record this failure (the provisioning was given
    /// up, e.g. after crashing one worker after another).
    Abandon(&'a str),
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// Provisions the VM of an approved request: records the start, calls
    /// [`VspherePort::create_vm`], records the outcome on the VM stream, the
    /// request stream and the timeline.
    ///
    /// Idempotent: for a request that is not `Approved` (or `Provisioning`
    /// after a crash) it does nothing and returns [`ProvisionOutcome::Skipped`]
    /// saying why. A request left in `Provisioning` by a crashed run is
    /// resumed: the VM that run created is adopted, never cloned twice.
    /// vSphere failures are not errors of this call: they are recorded and
    /// returned as [`ProvisionOutcome::Failed`], except that an unavailable
    /// vCenter ([`VsphereError::is_unavailable`]) is not held against the
    /// request: the request records that it waits for vCenter (once per
    /// outage: one "Waiting for vCenter" on the timeline) and the call
    /// returns [`ProvisionOutcome::Deferred`]; call it again later. Only a
    /// request that has waited longer than the tenant's
    /// `timeouts.unavailable_deadline_secs` fails, with a message saying
    /// since when vCenter was unreachable (and naming no host).
    ///
    /// `create_vm` is called once: retrying a call is the vSphere client's
    /// job and retrying a request the runner's, so no layer here multiplies
    /// the attempts of another.
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::UnknownTenant`], or a
    /// store failure (rerun the call to finish the job).
    pub async fn provision(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let outcome = self
            .provision_inner(tenant, request_id, Mode::Record, &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await?;
        self.clean_up_after(tenant, request_id, &outcome).await;
        Ok(outcome)
    }

    /// A host's direct call removes what a failed attempt left, once the
    /// failure is recorded; a removal that fails is logged and does not
    /// change the outcome. With shared claims it puts the request's job back
    /// for a runner to retry; otherwise `cleanup_failed` retries it.
    async fn clean_up_after(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        outcome: &ProvisionOutcome,
    ) {
        if !matches!(outcome, ProvisionOutcome::Failed { .. }) {
            return;
        }
        if let Err(error) = self.cleanup_failed(tenant, request_id).await {
            warn!(%request_id, %error, "could not remove what the failed provisioning left; it is retried later");
        }
    }

    /// [`ProvisioningService::provision`] under `holder`'s claim: for a
    /// runner whose work-queue lease on the job is the claim (its worker id
    /// is the holder), so the call re-enters that claim instead of waiting
    /// for it.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Record, holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// [`ProvisioningService::provision_attempt`] under `holder`'s claim
    /// (see [`ProvisioningService::provision_as`]).
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_attempt_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Defer, holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// [`ProvisioningService::wait_for_vcenter`] under `holder`'s claim
    /// (see [`ProvisioningService::provision_as`]).
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn wait_for_vcenter_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        error: &VsphereError,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Wait(error), holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Like [`ProvisioningService::provision`], but any *retryable* vSphere
    /// failure is not recorded: the request stays in `Provisioning` and the
    /// call returns [`ProvisionOutcome::Deferred`], so a background runner
    /// can try again later (with backoff) and resume where this attempt
    /// stopped. Non-retryable failures are recorded as usual.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn provision_attempt(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let outcome = self
            .provision_inner(tenant, request_id, Mode::Defer, &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await?;
        self.clean_up_after(tenant, request_id, &outcome).await;
        Ok(outcome)
    }

    /// Asks the request's vCenter a cheap question (whether the request's VM
    /// exists) to learn whether it can be used again: `None` when it
    /// answered (whatever the answer), else the error that says it is still
    /// unavailable. For a background runner probing a vCenter it parked;
    /// nothing is recorded.
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::UnknownTenant`], or a
    /// store failure.
    pub async fn check_vcenter(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Option<VsphereError>, ServiceError> {
        let request = self
            .request(tenant, request_id)
            .await?
            .ok_or(ServiceError::RequestNotFound(request_id))?;
        let config = self.tenant(tenant)?;
        // find_vm looks up the name in the folder; the id only matters to
        // adoption, so a request not started yet can use a placeholder.
        let vm_id = request.vm_id.unwrap_or(VmId::from_uuid(uuid::Uuid::nil()));
        let spec = VmSpec::for_request(
            config,
            request_id,
            vm_id,
            &request.vm_name,
            &request.project_prefix,
            request.resources,
        );
        match self.vsphere.find_vm(&spec).await {
            Err(error) if error.is_unavailable() => Ok(Some(error)),
            Err(error) => {
                debug!(%error, "vCenter answered the probe with an error; it is reachable");
                Ok(None)
            }
            Ok(_) => Ok(None),
        }
    }

    /// Records, without calling vSphere, that the request waits for its
    /// vCenter, which is known to be unusable (`error`, e.g. what the last
    /// attempt against that vCenter met): for a background runner that holds
    /// back the work of an endpoint that is down. Like an attempt that met
    /// `error`, it starts provisioning an `Approved` request, writes "Waiting
    /// for vCenter" once per outage and returns
    /// [`ProvisionOutcome::Deferred`], or fails the request once it has
    /// waited longer than the tenant's `timeouts.unavailable_deadline_secs`.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn wait_for_vcenter(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        error: &VsphereError,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Wait(error), &self.holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    /// Fails the request without calling vSphere, with `message` (which
    /// must say why and name no host): for a background runner that gives
    /// up on a request whose provisioning kept stopping without finishing
    /// (each worker that took it died or hung). Like an attempt, it starts
    /// provisioning an `Approved` request first, and a VM stream that already
    /// holds the outcome wins: a VM recorded ready makes the request ready.
    /// Requests in other states are skipped.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn abandon(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        message: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.abandon_as(tenant, request_id, message, &self.holder)
            .await
    }

    /// [`ProvisioningService::abandon`] under `holder`'s claim (see
    /// [`ProvisioningService::provision_as`]): the runner gives up on a job
    /// whose lease it holds.
    ///
    /// # Errors
    /// As [`ProvisioningService::provision`].
    pub async fn abandon_as(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        message: &str,
        holder: &str,
    ) -> Result<ProvisionOutcome, ServiceError> {
        self.provision_inner(tenant, request_id, Mode::Abandon(message), holder)
            .instrument(provision_span(tenant, request_id))
            .await
    }

    pub(super) async fn provision_claimed(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        mode: Mode<'_>,
        claim: &ClaimState,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let stream = request_stream(request_id);
        let mut started_here = false;
        let (request, actor, vm_id) = 'claim: {
            for _ in 0..MAX_CONFLICT_RETRIES {
                let loaded = self.load::<VmRequest>(tenant, &stream).await?;
                let Some(request) = loaded.state.clone() else {
                    return Err(ServiceError::RequestNotFound(request_id));
                };
                tracing::Span::current().record("vm_name", request.vm_name.as_str());
                // Whatever happens next, the timeline must show what the
                // stream already says (a crash may have cut it short).
                self.record_request_timeline(tenant, request_id, &loaded)
                    .await?;
                let actor = Actor {
                    tenant,
                    user: request.decided_by.unwrap_or(request.requested_by),
                    correlation: loaded
                        .events
                        .last()
                        .map(|(m, _)| m.correlation_id)
                        .unwrap_or_else(|| CorrelationId::from_uuid(self.ids.new_uuid())),
                };
                match request.status {
                    VmRequestStatus::Approved => {}
                    VmRequestStatus::Provisioning if !started_here => {
                        // A previous run started and did not finish: resume.
                        let vm_id = request.vm_id.ok_or(DomainError::Invalid(
                            "a provisioning request without a VM id".into(),
                        ))?;
                        info!(%vm_id, "resuming an interrupted provisioning");
                        break 'claim (request, actor, vm_id);
                    }
                    VmRequestStatus::Provisioning => {
                        return Ok(ProvisionOutcome::Skipped {
                            status: request.status,
                            reason: "another caller started provisioning this request just now"
                                .into(),
                        });
                    }
                    status => {
                        let reason = skip_reason(&request);
                        info!(%status, "nothing to provision: {reason}");
                        return Ok(ProvisionOutcome::Skipped { status, reason });
                    }
                }
                let vm_id = VmId::from_uuid(self.ids.new_uuid());
                let events = VmRequest::handle(
                    Some(&request),
                    &VmRequestCommand::StartProvisioning { vm_id },
                )?;
                match self.append(actor, &stream, &loaded, events).await? {
                    Some(written) => {
                        self.record_request_timeline(tenant, request_id, &written)
                            .await?;
                        let request = written
                            .iter()
                            .try_fold(request, |s, (_, e)| VmRequest::apply(Some(s), e))
                            .ok_or(ServiceError::RequestNotFound(request_id))?;
                        break 'claim (request, actor, vm_id);
                    }
                    // Someone else changed the request: look again. If they
                    // started provisioning, we must not.
                    None => started_here = true,
                }
            }
            return Err(ServiceError::TooManyConflicts { stream });
        };
        tracing::Span::current().record("vm_id", tracing::field::display(vm_id));
        let config = self.tenant(tenant)?.clone();
        let fresh = VmSpec::for_request(
            &config,
            request_id,
            vm_id,
            &request.vm_name,
            &request.project_prefix,
            request.resources,
        );
        let vm = self.ensure_vm_started(actor, &request, &fresh).await?;
        let spec = match (recorded_spec(&config, &vm, fresh.clone()), mode) {
            // Giving up needs no vCenter, so a vCenter that is no longer
            // configured must not keep the request from failing.
            (Err(ServiceError::RecordedVcenterNotConfigured { .. }), Mode::Abandon(_)) => fresh,
            (spec, _) => spec?,
        };
        match vm.status {
            VmStatus::Provisioning => {}
            // A previous run recorded the outcome on the VM stream but not on
            // the request: finish that.
            VmStatus::Failed => {
                let failure =
                    vm.failure
                        .clone()
                        .unwrap_or_else(|| crate::vm::VmProvisioningFailed {
                            error_code: "Unknown".into(),
                            message: "provisioning failed".into(),
                            retryable: false,
                        });
                return self
                    .finish_failed(actor, request_id, vm_id, failure, None)
                    .await;
            }
            _ => {
                let result = provisioned(&vm).ok_or(ServiceError::VmNotProvisioned {
                    vm_id,
                    status: vm.status,
                })?;
                return self.finish_ready(actor, request_id, vm_id, result).await;
            }
        }

        let created = match mode {
            Mode::Abandon(message) => {
                warn!(message, "giving up on this provisioning");
                let failure = crate::vm::VmProvisioningFailed {
                    error_code: ABANDONED.to_owned(),
                    message: message.to_owned(),
                    retryable: false,
                };
                self.execute_vm(
                    actor,
                    vm_id,
                    VmCommand::RecordFailed {
                        error_code: failure.error_code.clone(),
                        message: failure.message.clone(),
                        retryable: failure.retryable,
                    },
                )
                .await?;
                return self
                    .finish_failed(actor, request_id, vm_id, failure, None)
                    .await;
            }
            Mode::Wait(error) => Err(error.clone()),
            Mode::Record | Mode::Defer => {
                self.check_claim(claim, request_id)?;
                self.create_vm_reporting(actor, request_id, vm_id, &spec)
                    .await
            }
        };
        match created {
            Ok(result) => {
                let at = self.clock.now();
                let vm = self
                    .execute_vm(
                        actor,
                        vm_id,
                        VmCommand::RecordProvisioned {
                            result: result.clone(),
                            at,
                        },
                    )
                    .await?;
                self.reconcile(actor, request_id, &vm, Some(result), None)
                    .await
            }
            // A request never fails because its vCenter cannot be reached:
            // the outage costs time, and a rerun resumes (adopting the VM if
            // the lost call created it).
            Err(error) if error.is_unavailable() => {
                self.wait_or_give_up(actor, &config, &request, vm_id, error, claim)
                    .await
            }
            Err(error) if error.is_retryable() && !matches!(mode, Mode::Record) => {
                warn!(error = %error, code = error.code(), "provisioning attempt failed; left for a retry");
                if request.waiting_since.is_some() {
                    // vCenter answered, so the wait is over; the next outage
                    // is a new one, with its own deadline.
                    let written = self
                        .execute_request_outcome(
                            actor,
                            request_id,
                            VmRequestCommand::MarkVcenterReachable,
                        )
                        .await?;
                    self.record_request_timeline(tenant, request_id, &written)
                        .await?;
                }
                Ok(ProvisionOutcome::Deferred { vm_id, error })
            }
            Err(error) => {
                warn!(error = %error, code = error.code(), "provisioning failed");
                // A failure is recorded only by the claim's holder: whoever
                // took over may be about to adopt the VM.
                self.check_claim(claim, request_id)?;
                let failure = crate::vm::VmProvisioningFailed {
                    error_code: error.code().to_owned(),
                    message: user_message(&error, &spec),
                    retryable: error.is_retryable(),
                };
                let vm = self
                    .execute_vm(
                        actor,
                        vm_id,
                        VmCommand::RecordFailed {
                            error_code: failure.error_code.clone(),
                            message: failure.message.clone(),
                            retryable: failure.retryable,
                        },
                    )
                    .await?;
                self.reconcile(actor, request_id, &vm, None, Some((failure, error)))
                    .await
            }
        }
    }

    /// Calls [`VspherePort::create_vm_reporting`] and records each stage it
    /// reports on the request (and so on its timeline) while the call goes
    /// on: the recording runs beside the call, never holding it up. Every
    /// report is recorded before this returns, so the outcome recorded next
    /// stays the timeline's last entry. A report that cannot be recorded
    /// (a store failure) is logged and dropped: progress is information,
    /// and the outcome still is recorded or retried as usual.
    async fn create_vm_reporting(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        spec: &VmSpec,
    ) -> Result<VmProvisioningResult, VsphereError> {
        let (sender, mut reports) = futures::channel::mpsc::unbounded();
        let vsphere = &self.vsphere;
        // The reporter lives inside this future, so the channel closes (and
        // the recording below ends) when the call returns.
        let create = async move {
            let report = move |progress| {
                // Only fails once the receiver is gone, i.e. never here.
                let _ = sender.unbounded_send(progress);
            };
            vsphere.create_vm_reporting(spec, &report).await
        };
        let record = async {
            while let Some(progress) = reports.next().await {
                self.record_progress(actor, request_id, vm_id, progress)
                    .await;
            }
        };
        let (created, ()) = futures::join!(create, record);
        created
    }

    async fn record_progress(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        progress: ProvisioningProgress,
    ) {
        let command = match progress {
            ProvisioningProgress::CustomizingGuest => {
                VmRequestCommand::MarkCustomizingGuest { vm_id }
            }
        };
        let recorded = match self
            .execute_request_outcome(actor, request_id, command)
            .await
        {
            Ok(written) => {
                self.record_request_timeline(actor.tenant, request_id, &written)
                    .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = recorded {
            warn!(%error, ?progress, "could not record the provisioning's progress; it goes on");
        }
    }

    /// The request's vCenter cannot be used: record that the request waits
    /// (once per outage) and defer it, or fail it once it has waited longer
    /// than the tenant's unavailable deadline.
    pub(super) async fn wait_or_give_up(
        &self,
        actor: Actor,
        config: &TenantConfig,
        request: &VmRequest,
        vm_id: VmId,
        error: VsphereError,
        claim: &ClaimState,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let request_id = request.id;
        let since = match request.waiting_since {
            Some(since) => since,
            None => {
                let command = VmRequestCommand::WaitForVcenter {
                    since: self.clock.now(),
                    error_code: error.code().to_owned(),
                };
                match self
                    .execute::<VmRequest>(actor, &request_stream(request_id), &command)
                    .await
                {
                    Ok((state, written)) => {
                        self.record_request_timeline(actor.tenant, request_id, &written)
                            .await?;
                        state.waiting_since.unwrap_or_else(|| self.clock.now())
                    }
                    // A concurrent run got there first: go by what it wrote.
                    Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => {
                        let current = self
                            .request(actor.tenant, request_id)
                            .await?
                            .ok_or(ServiceError::RequestNotFound(request_id))?;
                        match current.waiting_since {
                            Some(since) => since,
                            None => {
                                return Ok(ProvisionOutcome::Skipped {
                                    status: current.status,
                                    reason: skip_reason(&current),
                                });
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let waited = (self.clock.now() - since).to_std().unwrap_or_default();
        let deadline = config.timeouts.unavailable_deadline();
        if waited < deadline {
            warn!(error = %error, code = error.code(), %since, "vCenter unavailable; provisioning waits for it");
            return Ok(ProvisionOutcome::Deferred { vm_id, error });
        }
        warn!(error = %error, code = error.code(), %since, ?deadline, "vCenter unavailable past the tenant's deadline; failing the request");
        let failure = crate::vm::VmProvisioningFailed {
            error_code: error.code().to_owned(),
            message: format!(
                "vCenter unreachable since {}; gave up after waiting {} minutes, this tenant's limit. Submit the request again once vCenter is back",
                utc_minute(since),
                deadline.as_secs().div_ceil(60)
            ),
            retryable: true,
        };
        self.check_claim(claim, request_id)?;
        let vm = self
            .execute_vm(
                actor,
                vm_id,
                VmCommand::RecordFailed {
                    error_code: failure.error_code.clone(),
                    message: failure.message.clone(),
                    retryable: failure.retryable,
                },
            )
            .await?;
        self.reconcile(actor, request_id, &vm, None, Some((failure, error)))
            .await
    }

    /// Records on the request what the VM stream says happened on vSphere,
    /// whichever run wrote it: a VM recorded ready makes the request ready
    /// even when this run's own attempt (a duplicate) failed, and a VM
    /// recorded failed first makes it failed. `created`/`failed` are what
    /// this run saw, reported when the stream agrees with them.
    pub(super) async fn reconcile(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm: &Vm,
        created: Option<VmProvisioningResult>,
        failed: Option<(crate::vm::VmProvisioningFailed, VsphereError)>,
    ) -> Result<ProvisionOutcome, ServiceError> {
        if vm.status == VmStatus::Failed {
            let (failure, error) = match failed {
                Some((failure, error)) => (failure, Some(error)),
                None => {
                    warn!(
                        "another run recorded this VM as failed first; the request follows the VM's record"
                    );
                    (
                        vm.failure
                            .clone()
                            .unwrap_or_else(|| crate::vm::VmProvisioningFailed {
                                error_code: "Unknown".into(),
                                message: "provisioning failed".into(),
                                retryable: false,
                            }),
                        None,
                    )
                }
            };
            return self
                .finish_failed(actor, request_id, vm.id, failure, error)
                .await;
        }
        if failed.is_some() {
            info!(
                "a concurrent run recorded the VM as provisioned; this run's failure does not count"
            );
        }
        let result = match (provisioned(vm), created) {
            (Some(result), _) => result,
            (None, Some(result)) => result,
            (None, None) => {
                return Err(ServiceError::VmNotProvisioned {
                    vm_id: vm.id,
                    status: vm.status,
                });
            }
        };
        self.finish_ready(actor, request_id, vm.id, result).await
    }

    /// Makes sure the VM stream exists (a crash may have happened between the
    /// request's and the VM's start events) and returns the VM.
    pub(super) async fn ensure_vm_started(
        &self,
        actor: Actor,
        request: &VmRequest,
        spec: &VmSpec,
    ) -> Result<Vm, ServiceError> {
        let started = VmProvisioningStarted {
            vm_id: spec.vm_id,
            request_id: request.id,
            tenant_id: request.tenant_id,
            name: request.vm_name.clone(),
            resources: request.resources,
            folder_path: spec.folder_path.clone(),
            placement: Some(Box::new(spec.placement())),
        };
        let stream = vm_stream(spec.vm_id);
        for _ in 0..MAX_CONFLICT_RETRIES {
            let loaded = self.load::<Vm>(actor.tenant, &stream).await?;
            if let Some(vm) = loaded.state {
                return Ok(vm);
            }
            let events = Vm::handle(None, &VmCommand::StartProvisioning(started.clone()))?;
            if let Some(written) = self.append(actor, &stream, &loaded, events).await? {
                return written
                    .iter()
                    .fold(None, |s, (_, e)| Vm::apply(s, e))
                    .ok_or(ServiceError::VmNotFound(spec.vm_id));
            }
        }
        Err(ServiceError::TooManyConflicts { stream })
    }

    /// Applies a command to the VM; when a concurrent run already recorded
    /// the outcome, returns the VM as that run left it.
    pub(super) async fn execute_vm(
        &self,
        actor: Actor,
        vm_id: VmId,
        command: VmCommand,
    ) -> Result<Vm, ServiceError> {
        let stream = vm_stream(vm_id);
        match self.execute::<Vm>(actor, &stream, &command).await {
            Ok((vm, _)) => Ok(vm),
            Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => self
                .load::<Vm>(actor.tenant, &stream)
                .await?
                .state
                .ok_or(ServiceError::VmNotFound(vm_id)),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn finish_ready(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        result: VmProvisioningResult,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let written = self
            .execute_request_outcome(
                actor,
                request_id,
                VmRequestCommand::MarkReady {
                    result: result.clone(),
                    at: self.clock.now(),
                },
            )
            .await?;
        self.record_request_timeline(actor.tenant, request_id, &written)
            .await?;
        info!(
            vmware_vm_id = %result.vmware_vm_id,
            ip = ?result.ip_address,
            "VM ready"
        );
        Ok(ProvisionOutcome::Ready { vm_id, result })
    }

    pub(super) async fn finish_failed(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        vm_id: VmId,
        failure: crate::vm::VmProvisioningFailed,
        error: Option<VsphereError>,
    ) -> Result<ProvisionOutcome, ServiceError> {
        let written = self
            .execute_request_outcome(
                actor,
                request_id,
                VmRequestCommand::MarkFailed {
                    error_code: failure.error_code.clone(),
                    message: failure.message.clone(),
                    retryable: failure.retryable,
                },
            )
            .await?;
        self.record_request_timeline(actor.tenant, request_id, &written)
            .await?;
        let error = error.unwrap_or(VsphereError::TaskFailed {
            fault: failure.error_code,
            message: failure.message,
        });
        Ok(ProvisionOutcome::Failed { vm_id, error })
    }

    /// Records the outcome on the request; a concurrent run that recorded it
    /// first is fine (nothing more is written).
    pub(super) async fn execute_request_outcome(
        &self,
        actor: Actor,
        request_id: VmRequestId,
        command: VmRequestCommand,
    ) -> Result<Written<VmRequest>, ServiceError> {
        match self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await
        {
            Ok((_, written)) => Ok(written),
            Err(ServiceError::Domain(DomainError::InvalidTransition { .. })) => {
                Ok(Written::nothing())
            }
            Err(e) => Err(e),
        }
    }
}

/// The configured vCenter that holds `vm`: the one its provisioning
/// recorded. VMware's VM ids are per vCenter, so any call about an existing
/// VM goes there or nowhere. VMs recorded before placements were (v1)
/// follow the configuration, as they always did.
pub(super) fn vcenter_of<'a>(
    config: &'a TenantConfig,
    vm: &Vm,
) -> Result<&'a VcenterEndpoint, ServiceError> {
    match &vm.placement {
        Some(placement) if endpoint_key(&placement.endpoint_url) != config.vcenter.key() => {
            Err(ServiceError::RecordedVcenterNotConfigured { vm_id: vm.id })
        }
        _ => Ok(&config.vcenter),
    }
}

/// The spec of a VM whose provisioning started: built from what its start
/// recorded, so that a resume finds (and adopts) the VM it started even when
/// the tenant's configuration changed since; `fresh` (from the current
/// configuration) is what a new provisioning would use. Only the
/// credentials come from the current configuration, and only for the
/// recorded vCenter.
pub(super) fn recorded_spec(
    config: &TenantConfig,
    vm: &Vm,
    fresh: VmSpec,
) -> Result<VmSpec, ServiceError> {
    let Some(placement) = &vm.placement else {
        // Started by a release that recorded only the folder: everything
        // else comes from the current configuration, as it did then.
        return Ok(VmSpec {
            folder_path: vm.folder_path.clone(),
            ..fresh
        });
    };
    let mut current = fresh.placement();
    if placement.customization_secs.is_none() {
        // Recorded before the customization wait was: that it is missing
        // is no change of the configuration.
        current.customization_secs = None;
    }
    if *placement == current {
        return Ok(fresh);
    }
    vcenter_of(config, vm)?;
    info!(
        folder = %placement.folder_path,
        datastore = %placement.datastore,
        "the tenant's configuration changed since this provisioning started; resuming with the recorded placement"
    );
    Ok(VmSpec::from_placement(
        placement,
        &config.vcenter,
        fresh.tenant_id,
        fresh.request_id,
        fresh.vm_id,
        &fresh.name,
        vm.resources,
    ))
}

/// The span of one provisioning; the VM name and id are recorded once known.
pub(super) fn provision_span(tenant: TenantId, request_id: VmRequestId) -> tracing::Span {
    info_span!(
        "provision",
        request_id = %request_id,
        tenant = %tenant,
        vm_name = tracing::field::Empty,
        vm_id = tracing::field::Empty,
    )
}

/// What a VM recorded as provisioned reports, from its stream.
pub(super) fn provisioned(vm: &Vm) -> Option<VmProvisioningResult> {
    Some(VmProvisioningResult {
        vmware_vm_id: vm.vmware_vm_id.clone()?,
        ip_address: vm.ip_address,
        hostname: vm.hostname.clone().unwrap_or_else(|| vm.name.to_string()),
        warning_message: vm.warning_message.clone(),
    })
}

pub(super) fn skip_reason(request: &VmRequest) -> String {
    match request.status {
        VmRequestStatus::Pending => "the request is not approved yet".into(),
        VmRequestStatus::Ready => "the VM is already provisioned".into(),
        VmRequestStatus::Rejected => "the request was rejected".into(),
        VmRequestStatus::Cancelled => "the request was cancelled".into(),
        VmRequestStatus::Failed => {
            "provisioning already failed; retry the request or file a new one".into()
        }
        VmRequestStatus::Approved | VmRequestStatus::Provisioning => {
            "the request is being provisioned".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Secret, Timeouts};
    use crate::ids::{TenantId, VmId, VmRequestId};
    use crate::size::VmResources;
    use crate::spec::{SizeTable, VmName, VmPlacement};
    use crate::vm::VmEvent;

    fn config() -> TenantConfig {
        TenantConfig {
            tenant_id: TenantId::from_uuid(uuid::Uuid::from_u128(1)),
            slug: "acme".into(),
            vcenter: VcenterEndpoint {
                url: "https://vc.example.invalid/sdk".into(),
                username: "svc".into(),
                password: Secret::new("pw"),
                insecure: false,
                thumbprint: None,
                allow_plain_http: false,
            },
            datacenter: "DC0".into(),
            cluster: "DC0_C0".into(),
            resource_pool: None,
            datastore: "LocalDS_0".into(),
            template: "template".into(),
            network: "VM Network".into(),
            folder_root: None,
            sizes: SizeTable::default(),
            timeouts: Timeouts {
                customization_secs: 900,
                ..Timeouts::default()
            },
            on_failure: Default::default(),
        }
    }

    /// A VM whose start recorded `placement`.
    fn started(spec: &VmSpec, placement: VmPlacement) -> Vm {
        let event = VmEvent::VmProvisioningStarted(VmProvisioningStarted {
            vm_id: spec.vm_id,
            request_id: spec.request_id,
            tenant_id: spec.tenant_id,
            name: spec.name.clone(),
            resources: spec.resources,
            folder_path: spec.folder_path.clone(),
            placement: Some(Box::new(placement)),
        });
        Vm::apply(None, &event).expect("a started VM")
    }

    /// A start recorded before the placement held the customization wait is
    /// not a configuration change: with nothing else changed, the resume
    /// goes on with the tenant's configuration (and its customization wait),
    /// as it did before the wait was recorded.
    #[test]
    fn a_placement_without_the_customization_wait_is_no_change() {
        let config = config();
        let name = VmName::parse("web-app01").expect("a name");
        let resources = VmResources {
            cpu: 1,
            memory_mib: 1024,
            disk_gib: 10,
        };
        let fresh = VmSpec::for_request(
            &config,
            VmRequestId::from_uuid(uuid::Uuid::from_u128(2)),
            VmId::from_uuid(uuid::Uuid::from_u128(3)),
            &name,
            "web",
            resources,
        );
        let old = VmPlacement {
            customization_secs: None,
            ..fresh.placement()
        };
        let spec = recorded_spec(&config, &started(&fresh, old.clone()), fresh.clone())
            .expect("the recorded vCenter is configured");
        assert_eq!(spec, fresh);
        assert_eq!(spec.customization_timeout, Duration::from_secs(900));

        // Anything else changed: the recorded placement, and the default
        // wait for a start that did not record one.
        let moved = VmPlacement {
            datastore: "LocalDS_1".into(),
            ..old
        };
        let spec = recorded_spec(&config, &started(&fresh, moved), fresh.clone())
            .expect("the recorded vCenter is configured");
        assert_eq!(spec.datastore, "LocalDS_1");
        assert_eq!(
            spec.customization_timeout,
            Timeouts::default().customization()
        );
    }
}
