//! The runner's work queue and checkpoints on a real PostgreSQL server
//! (`DATABASE_URL`): exclusive claims under concurrency, lease expiry and
//! takeover, retries, release, and monotonic checkpoints under row-level
//! security.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use dvmm_core::ids::VmRequestId;
use dvmm_core::ports::StoreError;
use dvmm_core::runner::{CheckpointStore, WorkQueue};
use dvmm_store_postgres::{PgCheckpoints, PgWorkQueue, QueueCounts};
use support::{TestDb, tenant, within};
use uuid::Uuid;

fn request() -> VmRequestId {
    VmRequestId::from_uuid(Uuid::new_v4())
}

const LONG: Duration = Duration::from_secs(60);

/// Leases and delays that must end during a test. Real time on a shared
/// 2-core machine: every "not yet" check has this long to run, and each
/// assertion says how long it actually took.
const LEASE: Duration = Duration::from_secs(3);

/// How long after a lease or delay ends a test waits before expecting it to
/// be over (the database's `now()` is its transaction's start).
const MARGIN: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_share_a_job() {
    let Some(db) = TestDb::create("concurrent_claimers_never_share_a_job").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(12).await)
        .await
        .expect("the app role may run the queue");
    let t = tenant();
    let ids: HashSet<VmRequestId> = (0..300).map(|_| request()).collect();
    for id in &ids {
        queue.enqueue(t, *id).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            let mut mine = Vec::new();
            loop {
                let jobs = queue.claim(&worker, 7, LONG).await.unwrap();
                if jobs.is_empty() {
                    break;
                }
                mine.extend(jobs.into_iter().map(|j| j.request_id));
            }
            (worker, mine)
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        let (worker, mine) = within(LONG, "a claimer to empty the queue", task)
            .await
            .unwrap();
        for id in &mine {
            assert!(seen.insert(*id), "{id} was claimed twice");
        }
        let held: HashSet<_> = queue.held_by(&worker).await.unwrap().into_iter().collect();
        assert_eq!(held, mine.iter().copied().collect(), "{worker}");
    }
    assert_eq!(seen, ids);
    assert_eq!(
        queue.counts().await.unwrap(),
        QueueCounts {
            queued: 0,
            waiting: 0,
            leased: 300,
            expired: 0,
            done: 0
        }
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_is_idempotent_and_done_jobs_stay_done() {
    let Some(db) = TestDb::create("enqueue_is_idempotent_and_done_jobs_stay_done").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let (t, id) = (tenant(), request());
    queue.enqueue(t, id).await.unwrap();
    queue.enqueue(t, id).await.unwrap();
    let jobs = queue.claim("a", 10, LONG).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].tenant_id, jobs[0].request_id), (t, id));
    queue.complete("a", id).await.unwrap();
    // A re-fed approval must not run the job again.
    queue.enqueue(t, id).await.unwrap();
    assert!(queue.claim("b", 10, LONG).await.unwrap().is_empty());
    assert_eq!(queue.counts().await.unwrap().done, 1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_only_move_forward_and_are_per_tenant() {
    let Some(db) = TestDb::create("checkpoints_only_move_forward_and_are_per_tenant").await else {
        return;
    };
    let checkpoints = PgCheckpoints::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let (a, b) = (tenant(), tenant());
    assert_eq!(checkpoints.load("feed", a).await.unwrap(), 0);
    checkpoints.save("feed", a, 42).await.unwrap();
    checkpoints.save("feed", a, 7).await.unwrap();
    assert_eq!(checkpoints.load("feed", a).await.unwrap(), 42);
    assert_eq!(checkpoints.load("feed", b).await.unwrap(), 0);
    assert_eq!(checkpoints.load("other", a).await.unwrap(), 0);
    checkpoints.save("feed", b, 3).await.unwrap();
    assert_eq!(checkpoints.load("feed", b).await.unwrap(), 3);
    let err = checkpoints
        .save("feed", a, u64::MAX)
        .await
        .expect_err("a position beyond bigint is refused");
    assert!(
        matches!(&err, StoreError::Backend { retryable: false, message, .. } if message.contains("does not fit")),
        "{err:?}"
    );
    assert_eq!(
        checkpoints.load("feed", a).await.unwrap(),
        42,
        "and not saved"
    );

    // Row-level security: without a tenant scope the application role sees
    // no checkpoint at all.
    let pool = db.app_pool(1).await;
    let visible: i64 =
        dvmm_store_postgres::sqlx::query_scalar("SELECT count(*) FROM dvmm_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(visible, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_old_holder_is_locked_out() {
    let Some(db) =
        TestDb::create("an_expired_lease_is_taken_over_and_the_old_holder_is_locked_out").await
    else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let (t, id) = (tenant(), request());
    queue.enqueue(t, id).await.unwrap();
    let start = Instant::now();
    assert_eq!(queue.claim("dead", 1, LEASE).await.unwrap().len(), 1);
    // Still leased: nobody else gets it.
    let early = queue.claim("alive", 1, LEASE).await.unwrap();
    let elapsed = start.elapsed();
    assert!(
        early.is_empty(),
        "claimed by another worker {elapsed:?} after a {LEASE:?} lease began"
    );
    tokio::time::sleep_until(start + LEASE + MARGIN).await;
    assert_eq!(
        queue.counts().await.unwrap(),
        QueueCounts {
            expired: 1,
            ..QueueCounts::default()
        },
        "a lease that ran out counts as expired, {:?} after it began",
        start.elapsed()
    );
    let taken = queue.claim("alive", 1, LONG).await.unwrap();
    assert_eq!(
        taken.len(),
        1,
        "the lease must be claimable {:?} after a {LEASE:?} lease began",
        start.elapsed()
    );
    assert_eq!(taken[0].attempts, 0, "a takeover is not a failed attempt");
    // The old holder comes back: it may not renew, complete or release.
    assert!(!queue.renew("dead", id, LONG).await.unwrap());
    queue.complete("dead", id).await.unwrap();
    queue.release("dead", id).await.unwrap();
    queue.retry_later("dead", id, LONG).await.unwrap();
    assert_eq!(queue.held_by("alive").await.unwrap(), vec![id]);
    assert!(queue.renew("alive", id, LONG).await.unwrap());
    queue.complete("alive", id).await.unwrap();
    assert_eq!(queue.counts().await.unwrap().done, 1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_lease_alive() {
    let Some(db) = TestDb::create("renewal_keeps_a_lease_alive").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let (t, id) = (tenant(), request());
    queue.enqueue(t, id).await.unwrap();
    let start = Instant::now();
    queue.claim("a", 1, LEASE).await.unwrap();
    // Renew every third of the lease: each renewal has two thirds of it
    // (2 s) to spare, and the last check comes after the first lease would
    // have ended, so only the renewals can keep the job from "b".
    let step = LEASE / 3;
    let mut last_renewal = start;
    for i in 1..=4u32 {
        tokio::time::sleep_until(start + step * i).await;
        let since = last_renewal.elapsed();
        assert!(
            queue.renew("a", id, LEASE).await.unwrap(),
            "renewal {i} failed {since:?} after the previous one (lease {LEASE:?})"
        );
        last_renewal = Instant::now();
        assert!(queue.claim("b", 1, LEASE).await.unwrap().is_empty());
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed > LEASE,
        "the last check must come after the first lease would have ended ({elapsed:?})"
    );
    assert_eq!(queue.held_by("a").await.unwrap(), vec![id]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_their_delay_and_count_attempts_releases_do_not() {
    let Some(db) =
        TestDb::create("retries_wait_their_delay_and_count_attempts_releases_do_not").await
    else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let (t, id) = (tenant(), request());
    queue.enqueue(t, id).await.unwrap();
    queue.claim("a", 1, LONG).await.unwrap();
    let start = Instant::now();
    queue.retry_later("a", id, LEASE).await.unwrap();
    let early = queue.claim("a", 1, LONG).await.unwrap();
    let elapsed = start.elapsed();
    assert!(
        early.is_empty(),
        "claimed {elapsed:?} into a {LEASE:?} retry delay"
    );
    tokio::time::sleep_until(start + LEASE + MARGIN).await;
    let jobs = queue.claim("b", 1, LONG).await.unwrap();
    assert_eq!(
        jobs.len(),
        1,
        "not due {:?} after a {LEASE:?} delay began",
        start.elapsed()
    );
    assert_eq!(jobs[0].attempts, 1);
    queue.release("b", id).await.unwrap();
    let jobs = queue.claim("c", 1, LONG).await.unwrap();
    assert_eq!(jobs.len(), 1, "a released job is due at once");
    assert_eq!(jobs[0].attempts, 1, "a release does not count an attempt");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_are_claimed_before_the_backlog() {
    let Some(db) = TestDb::create("expired_leases_are_claimed_before_the_backlog").await else {
        return;
    };
    let queue = PgWorkQueue::new(db.app_pool(2).await)
        .await
        .expect("the app role may run the queue");
    let t = tenant();
    let orphan = request();
    queue.enqueue(t, orphan).await.unwrap();
    let start = Instant::now();
    queue.claim("dead", 1, LEASE).await.unwrap();
    // A backlog queued before the lease ends, so due earlier than it: by due
    // time alone the backlog would come first.
    for _ in 0..20 {
        queue.enqueue(t, request()).await.unwrap();
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed < LEASE,
        "the backlog took {elapsed:?} to queue, longer than the {LEASE:?} lease"
    );
    tokio::time::sleep_until(start + LEASE + MARGIN).await;
    let jobs = queue.claim("alive", 1, LONG).await.unwrap();
    assert_eq!(jobs.len(), 1, "something is due {:?} in", start.elapsed());
    assert_eq!(jobs[0].request_id, orphan, "the expired lease comes first");
    db.drop().await;
}
