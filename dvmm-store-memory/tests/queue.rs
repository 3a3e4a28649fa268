//! The memory work queue's scheduling: due times and leases on its clock,
//! and which give-backs count an attempt.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use dvmm_core::clock::ManualClock;
use dvmm_core::ids::{TenantId, VmRequestId};
use dvmm_core::runner::WorkQueue;
use dvmm_store_memory::MemoryWorkQueue;

fn setup() -> (Arc<ManualClock>, MemoryWorkQueue, VmRequestId) {
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap(),
    ));
    let queue = MemoryWorkQueue::with_clock(clock.clone());
    (
        clock,
        queue,
        VmRequestId::from_uuid(uuid::Uuid::from_u128(7)),
    )
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn postpone_gives_the_job_back_later_without_counting_an_attempt() {
    let (clock, queue, id) = setup();
    let tenant = TenantId::from_uuid(uuid::Uuid::from_u128(1));
    queue.enqueue(tenant, id).await.unwrap();
    let jobs = queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1);
    queue
        .postpone("w1", id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(queue.attempts(id), Some(0), "postponing counts no attempt");
    clock.advance(chrono::Duration::seconds(59));
    assert!(
        queue.claim("w1", 10, LEASE).await.unwrap().is_empty(),
        "not due yet"
    );
    clock.advance(chrono::Duration::seconds(1));
    let jobs = queue.claim("w2", 10, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1, "due after the delay");
    assert_eq!(jobs[0].attempts, 0);

    queue
        .retry_later("w2", id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(queue.attempts(id), Some(1), "a retry counts an attempt");
    clock.advance(chrono::Duration::seconds(5));
    let jobs = queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(jobs[0].attempts, 1);
}

#[tokio::test]
async fn only_the_lease_holder_can_postpone_and_leases_expire_on_the_clock() {
    let (clock, queue, id) = setup();
    let tenant = TenantId::from_uuid(uuid::Uuid::from_u128(1));
    queue.enqueue(tenant, id).await.unwrap();
    assert_eq!(queue.claim("w1", 1, LEASE).await.unwrap().len(), 1);
    queue
        .postpone("intruder", id, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(
        queue.renew("w1", id, LEASE).await.unwrap(),
        "w1 still holds the job"
    );
    clock.advance(chrono::Duration::seconds(29));
    assert!(queue.claim("w2", 1, LEASE).await.unwrap().is_empty());
    clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        queue.claim("w2", 1, LEASE).await.unwrap().len(),
        1,
        "taken over once the lease ran out on the queue's clock"
    );
}
