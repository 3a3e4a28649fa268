//! Reading requests, VMs and timelines.

use std::collections::BTreeMap;

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::event::DomainEvent;
use crate::event::EventMetadata;
use crate::ids::{TenantId, VmId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::read_model::{Cursor, Page, RequestFilter, RequestSummary, page_of};
use crate::timeline::TimelineEntry;
use crate::vm::Vm;
use crate::vm_request::{VmRequest, VmRequestEvent};

use super::aggregates::{request_stream, vm_stream};
use super::{ProvisioningService, ServiceError};

/// A request's state and its events with their metadata, as replayed.
type RequestHistory = (Option<VmRequest>, Vec<(EventMetadata, VmRequestEvent)>);
impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    /// The current state of a request.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn request(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Option<VmRequest>, ServiceError> {
        Ok(self
            .load::<VmRequest>(tenant, &request_stream(request_id))
            .await?
            .state)
    }

    /// The current state of a VM.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn vm(&self, tenant: TenantId, vm_id: VmId) -> Result<Option<Vm>, ServiceError> {
        Ok(self.load::<Vm>(tenant, &vm_stream(vm_id)).await?.state)
    }

    /// A request's timeline, oldest first.
    ///
    /// # Errors
    /// A store failure.
    pub async fn timeline(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, ServiceError> {
        Ok(self.timeline.list(tenant, request_id).await?)
    }

    /// Every request of a tenant, in the order they were filed.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn list_requests(&self, tenant: TenantId) -> Result<Vec<VmRequest>, ServiceError> {
        if self.read_model.is_some() {
            // The read model says which requests exist; each one is then
            // read from its own stream, not the tenant's whole history.
            let mut out = Vec::new();
            let mut after = None;
            loop {
                let page = self
                    .list_requests_page(tenant, &RequestFilter::default(), after, 500)
                    .await?;
                for row in &page.items {
                    if let Some(request) = self.request(tenant, row.request_id).await? {
                        out.push(request);
                    }
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            out.reverse();
            return Ok(out);
        }
        self.replay_requests(tenant).await
    }

    /// One page of the tenant's requests that pass `filter`, newest first,
    /// after `after` (the previous page's `next`), at most `limit`. Served
    /// by the read model when the service has one
    /// ([`ProvisioningService::with_read_model`]); otherwise computed by
    /// replaying the tenant's events.
    ///
    /// # Errors
    /// A store or decode failure.
    pub async fn list_requests_page(
        &self,
        tenant: TenantId,
        filter: &RequestFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Page<RequestSummary>, ServiceError> {
        if let Some(read_model) = &self.read_model {
            return Ok(read_model.list(tenant, filter, after, limit).await?);
        }
        let rows = self.replay_summaries(tenant).await?;
        Ok(page_of(rows, filter, after, limit))
    }

    /// Rebuilds the tenant's read-model rows from its events (for a read
    /// model added to existing data, or one that was lost); returns how
    /// many requests it wrote. Safe while the service runs: a row is never
    /// replaced by an older version.
    ///
    /// # Errors
    /// [`ServiceError::NoReadModel`] without one, or a store failure.
    pub async fn rebuild_read_model(&self, tenant: TenantId) -> Result<usize, ServiceError> {
        let Some(read_model) = &self.read_model else {
            return Err(ServiceError::NoReadModel);
        };
        let rows = self.replay_summaries(tenant).await?;
        let count = rows.len();
        for row in rows {
            read_model.upsert(row).await?;
        }
        Ok(count)
    }

    /// Every request of the tenant as a read-model row, from its events.
    async fn replay_summaries(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<RequestSummary>, ServiceError> {
        let mut streams: BTreeMap<String, RequestHistory> = BTreeMap::new();
        let mut after = 0;
        loop {
            let page = self.store.read_all(tenant, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for stored in page
                .iter()
                .filter(|e| e.stream_id.stream_type == VmRequest::STREAM_TYPE)
            {
                let event = VmRequestEvent::decode(stored)?;
                let (state, events) = streams.entry(stored.stream_id.id.clone()).or_default();
                *state = VmRequest::apply(state.take(), &event);
                events.push((stored.metadata.clone(), event));
            }
        }
        Ok(streams
            .values()
            .filter_map(|(state, events)| {
                state
                    .as_ref()
                    .and_then(|request| RequestSummary::from_stream(request, events))
            })
            .collect())
    }

    async fn replay_requests(&self, tenant: TenantId) -> Result<Vec<VmRequest>, ServiceError> {
        let mut order = Vec::new();
        let mut requests: BTreeMap<String, Option<VmRequest>> = BTreeMap::new();
        let mut after = 0;
        loop {
            let page = self.store.read_all(tenant, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for stored in page
                .iter()
                .filter(|e| e.stream_id.stream_type == VmRequest::STREAM_TYPE)
            {
                let event = VmRequestEvent::decode(stored)?;
                let slot = requests
                    .entry(stored.stream_id.id.clone())
                    .or_insert_with(|| {
                        order.push(stored.stream_id.id.clone());
                        None
                    });
                *slot = VmRequest::apply(slot.take(), &event);
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|id| requests.remove(&id).flatten())
            .collect())
    }
}
