//! The timeline projection: the entry each request event shows its user.

use crate::clock::{Clock, IdGenerator};
use crate::event::EventMetadata;
use crate::ids::{TenantId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::timeline::{TimelineEntry, TimelineEntryType};
use crate::vm_request::VmRequestEvent;

use super::user_messages::utc_minute;
use super::{ProvisioningService, ServiceError};
impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    pub(super) async fn record_request_timeline(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        events: &[(EventMetadata, VmRequestEvent)],
    ) -> Result<(), ServiceError> {
        for (metadata, event) in events {
            let (entry_type, details) = timeline_entry_for(event);
            self.timeline
                .record(TimelineEntry {
                    event_id: metadata.event_id,
                    tenant_id: tenant,
                    request_id,
                    entry_type,
                    details,
                    occurred_at: metadata.occurred_at,
                })
                .await?;
        }
        Ok(())
    }
}

/// The timeline entry a request event produces.
pub fn timeline_entry_for(event: &VmRequestEvent) -> (TimelineEntryType, String) {
    match event {
        VmRequestEvent::VmRequestCreated(e) => (
            TimelineEntryType::Created,
            format!(
                "Request created: {} ({}: {} vCPU, {} MiB, {} GiB)",
                e.vm_name, e.size, e.resources.cpu, e.resources.memory_mib, e.resources.disk_gib
            ),
        ),
        VmRequestEvent::VmRequestApproved(e) => (
            TimelineEntryType::Approved,
            format!("Approved by {}", e.approved_by),
        ),
        VmRequestEvent::VmRequestRejected(e) => (
            TimelineEntryType::Rejected,
            format!("Rejected: {}", e.reason),
        ),
        VmRequestEvent::VmRequestCancelled(e) => (
            TimelineEntryType::Cancelled,
            match &e.reason {
                Some(reason) => format!("Cancelled: {reason}"),
                None => "Cancelled".to_owned(),
            },
        ),
        VmRequestEvent::VmRequestProvisioningStarted(_) => (
            TimelineEntryType::ProvisioningStarted,
            "Provisioning started".to_owned(),
        ),
        VmRequestEvent::VmRequestReady(e) => (
            TimelineEntryType::VmReady,
            match e.ip_address {
                Some(ip) => format!("VM ready - IP: {ip}"),
                None => "VM ready (IP pending)".to_owned(),
            },
        ),
        VmRequestEvent::VmRequestProvisioningFailed(e) => (
            TimelineEntryType::ProvisioningFailed,
            format!(
                "Provisioning failed: {} {}",
                e.message,
                if e.retryable {
                    "(temporary problem: retrying may help)"
                } else {
                    "(retrying will not help until this is fixed)"
                }
            ),
        ),
        VmRequestEvent::VmRequestWaitingForVcenter(e) => (
            TimelineEntryType::WaitingForVcenter,
            format!(
                "Waiting for vCenter: unreachable since {}; provisioning continues when it is back",
                utc_minute(e.since)
            ),
        ),
        VmRequestEvent::VmRequestVcenterReachable(_) => (
            TimelineEntryType::VcenterReachable,
            "vCenter is reachable again; provisioning continues".to_owned(),
        ),
    }
}
