//! Reading requests, VMs and timelines.

use std::collections::BTreeMap;

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::event::DomainEvent;
use crate::ids::{TenantId, VmId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::timeline::TimelineEntry;
use crate::vm::Vm;
use crate::vm_request::{VmRequest, VmRequestEvent};

use super::aggregates::{request_stream, vm_stream};
use super::{ProvisioningService, ServiceError};
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
