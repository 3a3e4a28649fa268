//! The work queue's bounds on a real PostgreSQL server (`DATABASE_URL`):
//! claims are counted since the job was last given back, and finished jobs
//! are purged after a retention, by the app role, on the database clock.

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

/// Ends the job's lease now, as if its holder had died a lease ago.
async fn expire(admin: &PgPool, id: VmRequestId) {
    sqlx::query("UPDATE dvmm_jobs SET due_at = now() WHERE request_id = $1")
        .bind(id.as_uuid())
        .execute(admin)
        .await
        .expect("expire the lease");
}

#[tokio::test]
async fn claims_count_lost_leases_and_a_give_back_resets_them() {
    let Some(db) = db("claims_count_lost_leases_and_a_give_back_resets_them").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let admin = db.admin_pool(1).await;
    let id = VmRequestId::from_uuid(Uuid::new_v4());
    queue.enqueue(tenant(), id).await.unwrap();
    for n in 1..=3u32 {
        let jobs = queue.claim(&format!("w{n}"), 10, LEASE).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].claims, n, "claim {n} in a row without finishing");
        expire(&admin, id).await;
    }
    // A worker that gives the job back (a retry, a wait, a shutdown) did
    // not die on it: the count starts over.
    let jobs = queue.claim("w4", 10, LEASE).await.unwrap();
    assert_eq!(jobs[0].claims, 4);
    queue.postpone("w4", id, Duration::ZERO).await.unwrap();
    let jobs = queue.claim("w5", 10, LEASE).await.unwrap();
    assert_eq!(jobs[0].claims, 1);
    queue.retry_later("w5", id, Duration::ZERO).await.unwrap();
    let jobs = queue.claim("w6", 10, LEASE).await.unwrap();
    assert_eq!((jobs[0].claims, jobs[0].attempts), (1, 1));
    queue.release("w6", id).await.unwrap();
    assert_eq!(queue.claim("w7", 10, LEASE).await.unwrap()[0].claims, 1);
    db.drop().await;
}

#[tokio::test]
async fn finished_jobs_are_purged_after_the_retention_and_nothing_else_is() {
    let Some(db) = db("finished_jobs_are_purged_after_the_retention_and_nothing_else_is").await
    else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let admin = db.admin_pool(1).await;
    let old = VmRequestId::from_uuid(Uuid::new_v4());
    let recent = VmRequestId::from_uuid(Uuid::new_v4());
    let leased = VmRequestId::from_uuid(Uuid::new_v4());
    let queued = VmRequestId::from_uuid(Uuid::new_v4());
    for id in [old, recent, leased] {
        queue.enqueue(tenant(), id).await.unwrap();
    }
    assert_eq!(queue.claim("w", 10, LEASE).await.unwrap().len(), 3);
    queue.complete("w", old).await.unwrap();
    queue.complete("w", recent).await.unwrap();
    queue.enqueue(tenant(), queued).await.unwrap();
    // `old` finished two days ago; the queued and leased jobs are as old.
    sqlx::query(
        "UPDATE dvmm_jobs SET updated_at = now() - interval '2 days', \
                enqueued_at = now() - interval '2 days' \
          WHERE request_id <> $1",
    )
    .bind(recent.as_uuid())
    .execute(&admin)
    .await
    .unwrap();

    let day = Duration::from_secs(24 * 3600);
    assert_eq!(queue.purge_finished(day).await.unwrap(), 1, "only `old`");
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT request_id FROM dvmm_jobs ORDER BY request_id")
            .fetch_all(&admin)
            .await
            .unwrap();
    let mut expected = vec![recent.as_uuid(), leased.as_uuid(), queued.as_uuid()];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(queue.purge_finished(day).await.unwrap(), 0, "nothing twice");

    // Once purged, a re-read approval is queued again (and would find the
    // request finished); until then it is not.
    queue.enqueue(tenant(), recent).await.unwrap();
    assert_eq!(
        queue.counts().await.unwrap().queued,
        1,
        "`recent` stays done"
    );
    queue.enqueue(tenant(), old).await.unwrap();
    assert_eq!(queue.counts().await.unwrap().queued, 2);
    db.drop().await;
}
