//! Keeping the request read model up costs no extra read of the event
//! store: a service with a read model loads streams exactly as often as the
//! same service without one, for a submit, an approval and a provisioning.
//! The rows it keeps are still those of a rebuild from the events. Memory
//! adapters, the simulator and a store wrapper that counts loads.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{new_request, tenant_config, user};
use dvmm::core::event::{NewEvent, StoredEvent, StreamId};
use dvmm::core::ports::{AppendOutcome, StoreError};
use dvmm::core::read_model::{RequestFilter, RequestReadModel};
use dvmm::store::memory::{MemoryEventStore, MemoryRequests, MemoryTimeline};
use dvmm::vsphere::sim::Simulator;
use dvmm::{EventStore, ProvisionOutcome, ProvisioningService, TenantId, Tenants};

/// A memory store that counts `load` calls.
#[derive(Default)]
struct CountingStore {
    inner: MemoryEventStore,
    loads: AtomicUsize,
}

impl EventStore for CountingStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.inner
            .append(tenant, stream, expected_version, events)
            .await
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(tenant, stream).await
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(tenant, after, limit).await
    }
}

/// Loads per step (submit, approve, provision) of one request's life, and
/// the service's tenant.
async fn loads_per_step(
    read_model: Option<Arc<MemoryRequests>>,
) -> ([usize; 3], TenantId, Arc<CountingStore>) {
    let tenant = tenant_config("acme", 1);
    let store = Arc::new(CountingStore::default());
    let service = ProvisioningService::new(
        store.clone(),
        Simulator::default(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()).expect("a valid tenant"),
    );
    let service = match read_model {
        Some(model) => service.with_read_model(model),
        None => service,
    };
    let loads = || store.loads.swap(0, Ordering::SeqCst);
    let id = service
        .submit(new_request(&tenant, "app01"))
        .await
        .expect("submit");
    let submit = loads();
    service
        .approve(tenant.tenant_id, id, user())
        .await
        .expect("approve");
    let approve = loads();
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        service.provision(tenant.tenant_id, id),
    )
    .await
    .expect("the provisioning ended in time")
    .expect("provision");
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    ([submit, approve, loads()], tenant.tenant_id, store)
}

#[tokio::test(start_paused = true)]
async fn the_read_model_costs_no_extra_store_load() {
    let (without, _, _) = loads_per_step(None).await;
    let kept = Arc::new(MemoryRequests::new());
    let (with, tenant, store) = loads_per_step(Some(kept.clone())).await;
    assert_eq!(
        with, without,
        "store loads for [submit, approve, provision] with a read model vs without"
    );

    // The row kept as it went is the one a rebuild from the events gives.
    let rebuilt = Arc::new(MemoryRequests::new());
    let replaying = ProvisioningService::new(
        store,
        Simulator::default(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new(),
    )
    .with_read_model(rebuilt.clone());
    assert_eq!(
        replaying.rebuild_read_model(tenant).await.expect("rebuild"),
        1
    );
    let rows = |model: Arc<MemoryRequests>| async move {
        model
            .list(tenant, &RequestFilter::default(), None, 10)
            .await
            .expect("list")
            .items
    };
    let kept = rows(kept).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].status, dvmm::VmRequestStatus::Ready);
    assert_eq!(kept, rows(rebuilt).await, "kept vs rebuilt");
}
