//! The shared contracts of the runner's queue and checkpoints and of the
//! timeline (`dvmm_core::testing`), run against a real PostgreSQL
//! (`DATABASE_URL`), each on a database of its own.

mod support;

use dvmm_core::testing::{checkpoint_conformance, timeline_conformance, work_queue_conformance};
use support::TestDb;

#[tokio::test]
async fn pg_queue_passes_the_work_queue_contract() {
    let Some(db) = TestDb::create("pg_queue_passes_the_work_queue_contract").await else {
        return;
    };
    work_queue_conformance(&db.store(2).await.work_queue()).await;
    db.drop().await;
}

#[tokio::test]
async fn pg_checkpoints_pass_the_checkpoint_contract() {
    let Some(db) = TestDb::create("pg_checkpoints_pass_the_checkpoint_contract").await else {
        return;
    };
    checkpoint_conformance(&db.store(2).await.checkpoints()).await;
    db.drop().await;
}

#[tokio::test]
async fn pg_timeline_passes_the_timeline_contract() {
    let Some(db) = TestDb::create("pg_timeline_passes_the_timeline_contract").await else {
        return;
    };
    timeline_conformance(&db.store(2).await.timeline()).await;
    db.drop().await;
}

#[tokio::test]
async fn pg_requests_pass_the_read_model_contract() {
    let Some(db) = TestDb::create("pg_requests_pass_the_read_model_contract").await else {
        return;
    };
    dvmm_core::testing::read_model_conformance(&db.store(2).await.requests()).await;
    db.drop().await;
}
