//! `PgWorkQueue` as the request claims port on a real PostgreSQL server
//! (`DATABASE_URL`): one holder per request among concurrent callers and the
//! runner's claims, re-entry by the holder, takeover once the claim lapsed
//! (lapse injected by moving the row's deadline on the database clock), and
//! release that leaves the job finished or for the next caller.

mod support;

use std::io::Write;
use std::time::Duration;

use dvmm_core::ids::VmRequestId;
use dvmm_core::ports::{ClaimAttempt, RequestClaims};
use dvmm_core::runner::WorkQueue;
use dvmm_store_postgres::PgWorkQueue;
use support::{TestDb, tenant, within};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_among_concurrent_callers_and_the_runner() {
    let Some(db) = db("one_holder_among_concurrent_callers_and_the_runner").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(8).await)
        .await
        .expect("the app role may run the queue");
    let admin = db.admin_pool(1).await;
    let (t, id) = (tenant(), VmRequestId::from_uuid(Uuid::new_v4()));
    let attempts = futures::future::join_all((0..8).map(|n| {
        let queue = queue.clone();
        async move {
            let holder = format!("host-{n}");
            queue
                .acquire(t, id, &holder, LEASE)
                .await
                .map(|a| (holder, a))
        }
    }));
    let attempts = within(Duration::from_secs(30), "eight concurrent claims", attempts).await;
    let winners: Vec<String> = attempts
        .iter()
        .filter_map(|r| match r {
            Ok((holder, ClaimAttempt::Acquired { .. })) => Some(holder.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "{attempts:?}");
    let winner = &winners[0];
    for result in &attempts {
        match result {
            Ok((_, ClaimAttempt::HeldBy(other))) => assert_eq!(&other.holder, winner),
            Ok((_, ClaimAttempt::Acquired { .. })) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // The runner cannot take a claimed request; the holder re-enters.
    assert!(queue.claim("runner", 10, LEASE).await.unwrap().is_empty());
    assert!(matches!(
        queue.acquire(t, id, winner, LEASE).await.unwrap(),
        ClaimAttempt::AlreadyHeld { .. }
    ));
    // The holder crashes: its claim lapses (moved into the past on the
    // database clock) and the next caller takes it.
    sqlx::query("UPDATE dvmm_jobs SET due_at = now() - interval '1 second' WHERE request_id = $1")
        .bind(id.as_uuid())
        .execute(&admin)
        .await
        .unwrap();
    assert!(matches!(
        queue.acquire(t, id, "host-next", LEASE).await.unwrap(),
        ClaimAttempt::Acquired { .. }
    ));
    assert!(!queue.renew_claim(winner, id, LEASE).await.unwrap());
    assert!(queue.renew_claim("host-next", id, LEASE).await.unwrap());
    // Given back unfinished: the runner picks it up at once.
    queue.release_claim("host-next", id, false).await.unwrap();
    let jobs = queue.claim("runner", 10, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].request_id, id);
    // The runner's lease is the claim: a caller is told who has it.
    match queue.acquire(t, id, "host-late", LEASE).await.unwrap() {
        ClaimAttempt::HeldBy(other) => assert_eq!(other.holder, "runner"),
        other => panic!("expected HeldBy, got {other:?}"),
    }
    queue.complete("runner", id).await.unwrap();
    // A finished job can be claimed (the caller then finds the request
    // finished) and, released as finished, stays done.
    assert!(matches!(
        queue.acquire(t, id, "host-late", LEASE).await.unwrap(),
        ClaimAttempt::Acquired { .. }
    ));
    queue.release_claim("host-late", id, true).await.unwrap();
    assert_eq!(queue.counts().await.unwrap().done, 1);
    assert!(queue.claim("runner", 10, LEASE).await.unwrap().is_empty());
    db.drop().await;
}
