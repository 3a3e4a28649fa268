//! `PgWorkQueue::postpone` on a real PostgreSQL server (`DATABASE_URL`): a
//! job that waits for its vCenter goes back to the queue, due later on the
//! database clock, without counting an attempt, and only its lease holder
//! can postpone it.

mod support;

use std::io::Write;
use std::time::Duration;

use dvmm_core::ids::VmRequestId;
use dvmm_core::runner::WorkQueue;
use dvmm_store_postgres::PgWorkQueue;
use sqlx::PgPool;
use support::{TestDb, tenant};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

/// The test database, or `None` after saying why the test is skipped (also
/// in the file `DVMM_SKIP_LOG` names, when set).
async fn db(test: &str) -> Option<TestDb> {
    let present = std::env::var("DATABASE_URL").is_ok_and(|url| !url.is_empty());
    if !present
        && std::env::var("DVMM_REQUIRE_SERVICES").as_deref() != Ok("1")
        && let Ok(path) = std::env::var("DVMM_SKIP_LOG")
        && let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(log, "{test}: DATABASE_URL is not set");
    }
    TestDb::create(test).await
}

/// (state, attempts, seconds until due) of a job, read as the admin.
async fn row(admin: &PgPool, id: VmRequestId) -> (String, i32, f64) {
    sqlx::query_as(
        "SELECT state, attempts, \
                COALESCE(EXTRACT(EPOCH FROM (due_at - now()))::float8, 0) \
         FROM dvmm_jobs WHERE request_id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(admin)
    .await
    .expect("the job row")
}

#[tokio::test]
async fn postpone_requeues_later_without_counting_an_attempt() {
    let Some(db) = db("postpone_requeues_later_without_counting_an_attempt").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let admin = db.admin_pool(1).await;
    let id = VmRequestId::from_uuid(Uuid::new_v4());
    queue.enqueue(tenant(), id).await.unwrap();
    assert_eq!(queue.claim("w1", 10, LEASE).await.unwrap().len(), 1);

    queue
        .postpone("w1", id, Duration::from_secs(120))
        .await
        .unwrap();
    let (state, attempts, due_in) = row(&admin, id).await;
    assert_eq!((state.as_str(), attempts), ("queued", 0));
    assert!((100.0..=120.0).contains(&due_in), "due in {due_in} s");
    assert!(
        queue.claim("w2", 10, LEASE).await.unwrap().is_empty(),
        "not due before its delay"
    );

    // Due at once with no delay, and still no attempt counted.
    sqlx::query("UPDATE dvmm_jobs SET due_at = now() WHERE request_id = $1")
        .bind(id.as_uuid())
        .execute(&admin)
        .await
        .unwrap();
    let jobs = queue.claim("w2", 10, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempts, 0);

    // A retry, by contrast, counts one.
    queue
        .retry_later("w2", id, Duration::from_secs(120))
        .await
        .unwrap();
    let (state, attempts, _) = row(&admin, id).await;
    assert_eq!((state.as_str(), attempts), ("queued", 1));
    db.drop().await;
}

#[tokio::test]
async fn only_the_lease_holder_can_postpone() {
    let Some(db) = db("only_the_lease_holder_can_postpone").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let admin = db.admin_pool(1).await;
    let id = VmRequestId::from_uuid(Uuid::new_v4());
    queue.enqueue(tenant(), id).await.unwrap();
    assert_eq!(queue.claim("holder", 10, LEASE).await.unwrap().len(), 1);
    queue
        .postpone("intruder", id, Duration::from_secs(3600))
        .await
        .unwrap();
    let (state, attempts, _) = row(&admin, id).await;
    assert_eq!((state.as_str(), attempts), ("leased", 0));
    assert_eq!(queue.held_by("holder").await.unwrap(), [id]);
    db.drop().await;
}
