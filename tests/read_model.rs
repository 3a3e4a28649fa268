//! The request read model kept up by the service: pages filtered by status
//! and project agree with a replay of the events, `list_requests` reads it,
//! and a model rebuilt from the events equals the one kept up as it went.
//! Memory adapters and the simulator.

mod common;

use std::sync::Arc;

use common::{new_request, tenant_config, user};
use dvmm::core::read_model::{Cursor, Page, RequestFilter, RequestSummary};
use dvmm::store::memory::{MemoryEventStore, MemoryRequests, MemoryTimeline};
use dvmm::vsphere::sim::Simulator;
use dvmm::{ProjectId, ProvisioningService, ServiceError, Tenants, VmRequestStatus};

async fn all_pages<S, V, T>(
    service: &ProvisioningService<S, V, T>,
    tenant: dvmm::TenantId,
    filter: &RequestFilter,
) -> Vec<RequestSummary>
where
    S: dvmm::EventStore,
    V: dvmm::VspherePort,
    T: dvmm::TimelineSink,
{
    let mut out = Vec::new();
    let mut after: Option<Cursor> = None;
    for _ in 0..100 {
        let Page { items, next } = service
            .list_requests_page(tenant, filter, after, 3)
            .await
            .expect("a page");
        assert!(items.len() <= 3);
        out.extend(items);
        match next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
    panic!("pagination did not end");
}

#[tokio::test]
async fn the_read_model_follows_every_change_and_rebuilds_to_the_same_rows() {
    let tenant = tenant_config("acme", 1);
    let store = Arc::new(MemoryEventStore::new());
    let sim = Simulator::default();
    let model = Arc::new(MemoryRequests::new());
    let service = ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).unwrap(),
    )
    .with_read_model(model.clone());
    // Without a read model: the same answers by replaying the events.
    let replaying = ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).unwrap(),
    );

    let approver = user();
    let other_project = ProjectId::new_v4();
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut request = new_request(&tenant, &format!("app{i:02}"));
        if i % 2 == 1 {
            request.project_id = other_project;
        }
        ids.push(service.submit(request).await.unwrap());
    }
    for id in &ids[..5] {
        service
            .approve(tenant.tenant_id, *id, approver)
            .await
            .unwrap();
    }
    service
        .reject(tenant.tenant_id, ids[5], user(), "not now")
        .await
        .unwrap();
    for id in &ids[..3] {
        service.provision(tenant.tenant_id, *id).await.unwrap();
    }

    let everything = all_pages(&service, tenant.tenant_id, &RequestFilter::default()).await;
    assert_eq!(everything.len(), 8);
    assert!(
        everything
            .windows(2)
            .all(|w| (w[0].created_at, w[0].request_id.as_uuid())
                > (w[1].created_at, w[1].request_id.as_uuid())),
        "newest first"
    );
    assert_eq!(
        everything,
        all_pages(&replaying, tenant.tenant_id, &RequestFilter::default()).await,
        "the kept-up model says what the events say"
    );
    let ready = all_pages(
        &service,
        tenant.tenant_id,
        &RequestFilter {
            status: Some(VmRequestStatus::Ready),
            ..RequestFilter::default()
        },
    )
    .await;
    assert_eq!(ready.len(), 3);
    assert!(
        ready
            .iter()
            .all(|r| r.ip_address.is_some() && r.vm_id.is_some()),
        "{ready:?}"
    );
    let rejected = everything.iter().find(|r| r.request_id == ids[5]).unwrap();
    assert_eq!(rejected.status, VmRequestStatus::Rejected);
    assert_eq!(rejected.reason.as_deref(), Some("not now"));
    let in_other = all_pages(
        &service,
        tenant.tenant_id,
        &RequestFilter {
            project_id: Some(other_project),
            ..RequestFilter::default()
        },
    )
    .await;
    assert_eq!(in_other.len(), 4);

    // Timeline entries carry their facts beside the English text.
    let entries = service.timeline(tenant.tenant_id, ids[0]).await.unwrap();
    let approved = entries
        .iter()
        .find(|e| e.entry_type == dvmm::TimelineEntryType::Approved)
        .expect("an approval entry");
    assert_eq!(approved.fields.actor, Some(approver));
    let ready_entry = entries
        .iter()
        .find(|e| e.entry_type == dvmm::TimelineEntryType::VmReady)
        .expect("a ready entry");
    let row = everything.iter().find(|r| r.request_id == ids[0]).unwrap();
    assert_eq!(ready_entry.fields.ip_address, row.ip_address);
    assert_eq!(ready_entry.fields.vm_id, row.vm_id);
    let rejected_entries = service.timeline(tenant.tenant_id, ids[5]).await.unwrap();
    assert_eq!(
        rejected_entries.last().unwrap().fields.reason.as_deref(),
        Some("not now")
    );

    // list_requests reads through the model, oldest first as before.
    let listed = service.list_requests(tenant.tenant_id).await.unwrap();
    let listed_ids: Vec<_> = listed.iter().map(|r| r.id).collect();
    assert_eq!(listed_ids, ids);

    // A model rebuilt from the events equals the kept-up one.
    let rebuilt_model = Arc::new(MemoryRequests::new());
    let rebuilt = ProvisioningService::new(
        store.clone(),
        sim.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).unwrap(),
    )
    .with_read_model(rebuilt_model.clone());
    assert_eq!(
        rebuilt.rebuild_read_model(tenant.tenant_id).await.unwrap(),
        8
    );
    assert_eq!(
        all_pages(&rebuilt, tenant.tenant_id, &RequestFilter::default()).await,
        everything
    );
    assert!(matches!(
        replaying.rebuild_read_model(tenant.tenant_id).await,
        Err(ServiceError::NoReadModel)
    ));
}
