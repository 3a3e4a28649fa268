//! The timeline projection: the entry each request event shows its user.

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::event::EventMetadata;
use crate::ids::{TenantId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::read_model::RequestSummary;
use crate::timeline::{TimelineEntry, TimelineEntryType, TimelineFields};
use crate::vm_request::{VmRequest, VmRequestEvent};

use super::aggregates::{Loaded, Written};
use super::user_messages::utc_minute;
use super::{ProvisioningService, ServiceError};

/// What a caller hands [`ProvisioningService::record_request_timeline`]:
/// either way the whole stream is at hand, so the read model is projected
/// without loading the stream again.
pub(super) enum RequestEvents<'a> {
    /// A request stream as loaded, from its first event: every event gets
    /// its entry (a crash may have cut the timeline short).
    Stream(&'a [(EventMetadata, VmRequestEvent)]),
    /// Events just appended, with the stream they end.
    Appended(&'a Written<VmRequest>),
}

// From the loaded stream itself, not a bare list of events: a list of only
// the events just appended must not pass for a whole stream (the row's
// creation time and version come from the stream's first and last events).
impl<'a> From<&'a Loaded<VmRequest>> for RequestEvents<'a> {
    fn from(loaded: &'a Loaded<VmRequest>) -> Self {
        Self::Stream(&loaded.events)
    }
}

impl<'a> From<&'a Written<VmRequest>> for RequestEvents<'a> {
    fn from(written: &'a Written<VmRequest>) -> Self {
        Self::Appended(written)
    }
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    pub(super) async fn record_request_timeline<'a>(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
        events: impl Into<RequestEvents<'a>>,
    ) -> Result<(), ServiceError> {
        let (new, stream, state) = match events.into() {
            RequestEvents::Stream(stream) => {
                let state = stream.iter().fold(None, |s, (_, e)| VmRequest::apply(s, e));
                (stream, stream, state)
            }
            RequestEvents::Appended(written) => (
                &written.events[..],
                &written.stream[..],
                written.state.clone(),
            ),
        };
        for (metadata, event) in new {
            let (entry_type, details) = timeline_entry_for(event);
            self.timeline
                .record(TimelineEntry {
                    event_id: metadata.event_id,
                    tenant_id: tenant,
                    request_id,
                    entry_type,
                    details,
                    occurred_at: metadata.occurred_at,
                    fields: timeline_fields_for(event),
                })
                .await?;
        }
        if !new.is_empty()
            && let Some(request) = &state
        {
            self.project_request(request, stream).await?;
        }
        Ok(())
    }

    /// Brings the request's read-model row up to `stream`, the whole of
    /// its stream as the caller has it, leading to `request` (when the
    /// service has a read model).
    pub(super) async fn project_request(
        &self,
        request: &VmRequest,
        stream: &[(EventMetadata, VmRequestEvent)],
    ) -> Result<(), ServiceError> {
        let Some(read_model) = &self.read_model else {
            return Ok(());
        };
        if let Some(row) = RequestSummary::from_stream(request, stream) {
            read_model.upsert(row).await?;
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
        VmRequestEvent::VmRequestCustomizingGuest(_) => (
            TimelineEntryType::CustomizingGuest,
            "Customizing guest: applying its hostname and network settings".to_owned(),
        ),
        VmRequestEvent::VmRequestRetried(e) => (
            TimelineEntryType::RetryRequested,
            format!(
                "Retry requested by {} (attempt {})",
                e.retried_by, e.attempt
            ),
        ),
    }
}

/// The structured facts behind [`timeline_entry_for`]'s text.
pub fn timeline_fields_for(event: &VmRequestEvent) -> TimelineFields {
    let mut fields = TimelineFields::default();
    match event {
        VmRequestEvent::VmRequestCreated(e) => {
            fields.actor = Some(e.requested_by);
            fields.vm_name = Some(e.vm_name.as_str().to_owned());
        }
        VmRequestEvent::VmRequestApproved(e) => fields.actor = Some(e.approved_by),
        VmRequestEvent::VmRequestRejected(e) => {
            fields.actor = Some(e.rejected_by);
            fields.reason = Some(e.reason.clone());
        }
        VmRequestEvent::VmRequestCancelled(e) => {
            fields.actor = Some(e.cancelled_by);
            fields.reason = e.reason.clone();
        }
        VmRequestEvent::VmRequestProvisioningStarted(e) => fields.vm_id = Some(e.vm_id),
        VmRequestEvent::VmRequestReady(e) => {
            fields.vm_id = Some(e.vm_id);
            fields.ip_address = e.ip_address;
        }
        VmRequestEvent::VmRequestProvisioningFailed(e) => {
            fields.vm_id = Some(e.vm_id);
            fields.error_code = Some(e.error_code.clone());
            fields.reason = Some(e.message.clone());
            fields.retryable = Some(e.retryable);
        }
        VmRequestEvent::VmRequestWaitingForVcenter(e) => {
            fields.since = Some(e.since);
            fields.error_code = Some(e.error_code.clone());
        }
        VmRequestEvent::VmRequestVcenterReachable(e) => fields.since = Some(e.waiting_since),
        VmRequestEvent::VmRequestCustomizingGuest(e) => fields.vm_id = Some(e.vm_id),
        VmRequestEvent::VmRequestRetried(e) => {
            fields.actor = Some(e.retried_by);
            fields.vm_id = Some(e.failed_vm_id);
        }
    }
    fields
}
