//! The request commands a host calls for its users: submit, approve,
//! reject, cancel, and refreshing a VM's guest facts.

use tracing::{Instrument, info_span};

use crate::clock::{Clock, IdGenerator};
use crate::error::DomainError;
use crate::ids::{ProjectId, TenantId, UserId, VmId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::size::VmSize;
use crate::timeline::{TimelineEntry, TimelineEntryType};
use crate::vm::{Vm, VmCommand, VmEvent};
use crate::vm_request::{SubmitVmRequest, VmRequest, VmRequestCommand};

use super::aggregates::{request_stream, vm_stream};
use super::{ProvisioningService, ServiceError};

/// A new request, as a host receives it from its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVmRequest {
    /// Tenant.
    pub tenant_id: TenantId,
    /// Project.
    pub project_id: ProjectId,
    /// The project's prefix (first part of the VM name, and its folder).
    pub project_prefix: String,
    /// The name the user asks for.
    pub requested_name: String,
    /// Size (resolved through the tenant's size table).
    pub size: VmSize,
    /// Who asks.
    pub requested_by: UserId,
    /// Why.
    pub justification: String,
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// Files a new request (status `Pending`) and records `Created` on the
    /// timeline. Returns the new request's id.
    ///
    /// # Errors
    /// [`ServiceError::InvalidName`] for a bad name (carrying the
    /// [`NameError`](crate::NameError) that says which part is wrong),
    /// [`ServiceError::Domain`] for other bad input (an over-long
    /// justification, …), [`ServiceError::UnknownTenant`], or a store failure.
    pub async fn submit(&self, request: NewVmRequest) -> Result<VmRequestId, ServiceError> {
        let config = self.tenant(request.tenant_id)?;
        let request_id = VmRequestId::from_uuid(self.ids.new_uuid());
        let command = VmRequestCommand::Submit(SubmitVmRequest {
            request_id,
            tenant_id: request.tenant_id,
            project_id: request.project_id,
            project_prefix: request.project_prefix,
            requested_name: request.requested_name,
            size: request.size,
            resources: config.sizes.resources(request.size),
            requested_by: request.requested_by,
            justification: request.justification,
        });
        let actor = self.actor(request.tenant_id, request.requested_by);
        let (_, written) = self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await?;
        self.record_request_timeline(request.tenant_id, request_id, &written)
            .await?;
        Ok(request_id)
    }

    pub(super) async fn decide(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        user: UserId,
        command: VmRequestCommand,
    ) -> Result<VmRequest, ServiceError> {
        let actor = self.actor(tenant, user);
        let (state, written) = self
            .execute::<VmRequest>(actor, &request_stream(request_id), &command)
            .await
            .map_err(|e| match e {
                ServiceError::Domain(DomainError::NotFound { .. }) => {
                    ServiceError::RequestNotFound(request_id)
                }
                e => e,
            })?;
        self.record_request_timeline(tenant, request_id, &written)
            .await?;
        Ok(state)
    }

    /// Approves a pending request, recording who approved it. Provisioning
    /// starts with [`ProvisioningService::provision`] (directly, or from a
    /// background runner).
    ///
    /// # Errors
    /// [`ServiceError::RequestNotFound`], [`ServiceError::Domain`] when the
    /// request is not pending, or a store failure.
    pub async fn approve(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        approver: UserId,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            approver,
            VmRequestCommand::Approve { by: approver },
        )
        .await
    }

    /// Rejects a pending request with a reason the requester can read.
    ///
    /// # Errors
    /// As [`ProvisioningService::approve`]; an empty reason is refused.
    pub async fn reject(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        approver: UserId,
        reason: impl Into<String>,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            approver,
            VmRequestCommand::Reject {
                by: approver,
                reason: reason.into(),
            },
        )
        .await
    }

    /// Cancels a request that is pending or approved (not yet provisioning).
    ///
    /// # Errors
    /// As [`ProvisioningService::approve`].
    pub async fn cancel(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        user: UserId,
        reason: Option<String>,
    ) -> Result<VmRequest, ServiceError> {
        self.decide(
            tenant,
            request_id,
            user,
            VmRequestCommand::Cancel { by: user, reason },
        )
        .await
    }

    /// Reads a provisioned VM's live guest facts from vSphere (the user
    /// "refreshes to get the IP later") and records them when they changed.
    ///
    /// # Errors
    /// [`ServiceError::VmNotFound`], [`ServiceError::VmNotProvisioned`],
    /// [`ServiceError::RecordedVcenterNotConfigured`] when the VM's vCenter
    /// is no longer configured, [`ServiceError::Vsphere`], or a store
    /// failure.
    pub async fn refresh_guest_info(
        &self,
        tenant: TenantId,
        vm_id: VmId,
    ) -> Result<Vm, ServiceError> {
        let span = info_span!("refresh_guest_info", tenant = %tenant, vm_id = %vm_id);
        async {
            let config = self.tenant(tenant)?.clone();
            let stream = vm_stream(vm_id);
            let loaded = self.load::<Vm>(tenant, &stream).await?;
            let vm = loaded.state.ok_or(ServiceError::VmNotFound(vm_id))?;
            let vmware_vm_id = vm
                .vmware_vm_id
                .clone()
                .ok_or(ServiceError::VmNotProvisioned {
                    vm_id,
                    status: vm.status,
                })?;
            let vcenter = super::flow::vcenter_of(&config, &vm)?;
            let info = self.vsphere.get_vm(vcenter, &vmware_vm_id).await?;
            let user = loaded
                .events
                .last()
                .map(|(m, _)| m.user_id)
                .unwrap_or_else(|| UserId::from_uuid(self.ids.new_uuid()));
            let actor = self.actor(tenant, user);
            let command = VmCommand::RefreshGuestInfo {
                ip_address: info.ip_address,
                hostname: info.hostname,
                power_state: info.power_state,
            };
            let (vm, written) = self.execute::<Vm>(actor, &stream, &command).await?;
            for (metadata, event) in &written {
                if let VmEvent::VmGuestInfoRefreshed(e) = event {
                    let details = match e.ip_address {
                        Some(ip) => format!("Guest info refreshed - IP: {ip}"),
                        None => "Guest info refreshed (IP still pending)".to_owned(),
                    };
                    self.timeline
                        .record(TimelineEntry {
                            event_id: metadata.event_id,
                            tenant_id: tenant,
                            request_id: vm.request_id,
                            entry_type: TimelineEntryType::GuestInfoRefreshed,
                            details,
                            occurred_at: metadata.occurred_at,
                            fields: crate::timeline::TimelineFields {
                                vm_id: Some(vm.id),
                                ip_address: e.ip_address,
                                ..Default::default()
                            },
                        })
                        .await?;
                }
            }
            Ok(vm)
        }
        .instrument(span)
        .await
    }
}
