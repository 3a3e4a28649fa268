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

#[tokio::test]
async fn memory_queue_passes_the_work_queue_contract() {
    dvmm_core::testing::work_queue_conformance(&dvmm_store_memory::MemoryWorkQueue::new()).await;
}

#[tokio::test]
async fn memory_checkpoints_pass_the_checkpoint_contract() {
    dvmm_core::testing::checkpoint_conformance(&dvmm_store_memory::MemoryCheckpoints::new()).await;
}

#[tokio::test]
async fn memory_timeline_passes_the_timeline_contract() {
    dvmm_core::testing::timeline_conformance(&dvmm_store_memory::MemoryTimeline::new()).await;
}

#[tokio::test]
async fn memory_requests_pass_the_read_model_contract() {
    dvmm_core::testing::read_model_conformance(&dvmm_store_memory::MemoryRequests::new()).await;
}
