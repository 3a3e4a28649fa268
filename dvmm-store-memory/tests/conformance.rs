//! The shared store contract, run against the memory store.

use dvmm_core::testing::store_conformance;
use dvmm_store_memory::MemoryEventStore;

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    store_conformance(&MemoryEventStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_survives_parallel_writers_on_threads() {
    use std::sync::Arc;
    let store = Arc::new(MemoryEventStore::new());
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                dvmm_core::testing::concurrent_writers_on_one_stream(&*store, 16).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.len(), 4 * 17);
}
