//! Test support for hosts and adapters (feature `testing`):
//! - [`store_conformance`]: the contract every [`EventStore`] must pass;
//! - [`work_queue_conformance`], [`checkpoint_conformance`],
//!   [`timeline_conformance`], [`read_model_conformance`] and
//!   [`vsphere_conformance`]: the same for the runner's queue and
//!   checkpoints, the timeline, the request read model and the vSphere
//!   port, so a host writing its own adapter has something to check it
//!   against;
//! - [`AggregateTest`]: a given/when/then harness for aggregates.

use std::fmt::Debug;

use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::DomainError;
use crate::event::{EventMetadata, NewEvent, StreamId};
use crate::ids::{CorrelationId, EventId, TenantId, UserId};
use crate::ports::{AppendOutcome, EventStore, StoreError};

/// Given/when/then for an aggregate:
///
/// ```
/// use dvmm_core::testing::AggregateTest;
/// use dvmm_core::vm_request::{VmRequest, VmRequestCommand};
/// use dvmm_core::ids::UserId;
///
/// AggregateTest::<VmRequest>::given_no_events()
///     .when(VmRequestCommand::Approve { by: UserId::from_uuid(uuid::Uuid::nil()) })
///     .then_expect_error(|e| matches!(e, dvmm_core::DomainError::NotFound { .. }));
/// ```
pub struct AggregateTest<A: Aggregate> {
    state: Option<A>,
}

impl<A: Aggregate> AggregateTest<A>
where
    A::Event: Debug + PartialEq,
{
    /// Starts from no events.
    pub fn given_no_events() -> Self {
        Self { state: None }
    }

    /// Starts from these events.
    pub fn given(events: &[A::Event]) -> Self {
        Self {
            state: A::reconstitute(events),
        }
    }

    /// Runs the command.
    pub fn when(self, command: A::Command) -> AggregateResult<A> {
        let result = A::handle(self.state.as_ref(), &command);
        AggregateResult {
            state: self.state,
            result,
        }
    }
}

/// The outcome of [`AggregateTest::when`].
pub struct AggregateResult<A: Aggregate> {
    state: Option<A>,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> AggregateResult<A>
where
    A::Event: Debug + PartialEq,
{
    /// Asserts the emitted events; returns the state after applying them.
    #[track_caller]
    pub fn then_expect_events(self, expected: &[A::Event]) -> Option<A> {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "unexpected events");
                events.iter().fold(self.state, A::apply)
            }
            Err(e) => panic!("expected events {expected:?}, got error {e}"),
        }
    }

    /// Asserts a rejection matching `check`.
    #[track_caller]
    pub fn then_expect_error(self, check: impl FnOnce(&DomainError) -> bool) {
        match self.result {
            Ok(events) => panic!("expected an error, got events {events:?}"),
            Err(e) => assert!(check(&e), "unexpected error: {e:?}"),
        }
    }
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + seconds, 0)
        .single()
        .unwrap_or_default()
}

/// Builds test events for the conformance suite.
struct Fixture {
    tenant: TenantId,
}

impl Fixture {
    fn event(&self, label: &str) -> NewEvent {
        NewEvent {
            event_type: "ConformanceEvent".into(),
            schema_version: 1,
            payload: json!({ "label": label, "nested": { "n": [1, 2, 3] } }),
            metadata: EventMetadata {
                event_id: EventId::from_uuid(Uuid::new_v4()),
                tenant_id: self.tenant,
                user_id: UserId::from_uuid(Uuid::new_v4()),
                correlation_id: CorrelationId::from_uuid(Uuid::new_v4()),
                causation_id: None,
                occurred_at: at(0),
            },
        }
    }
}

fn new_stream(kind: &str) -> StreamId {
    StreamId::new(kind, Uuid::new_v4())
}

fn labels(events: &[crate::event::StoredEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.payload["label"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Runs every conformance check against `store`. The store may hold other
/// data: each check uses fresh tenants and streams. Panics on the first
/// broken rule, naming it.
pub async fn store_conformance<S: EventStore>(store: &S) {
    append_and_load_round_trip(store).await;
    expected_version_conflicts(store).await;
    empty_and_missing_streams(store).await;
    global_order_and_read_all_from_position(store).await;
    tenant_scoping(store).await;
    re_append_is_already_applied(store).await;
    concurrent_writers_on_one_stream(store, 16).await;
}

fn tenant() -> Fixture {
    Fixture {
        tenant: TenantId::from_uuid(Uuid::new_v4()),
    }
}

/// Events come back exactly as written, in version order.
pub async fn append_and_load_round_trip<S: EventStore>(store: &S) {
    let f = tenant();
    let stream = new_stream("Conformance");
    let batch = vec![f.event("a"), f.event("b"), f.event("c")];
    let outcome = store
        .append(f.tenant, &stream, 0, batch.clone())
        .await
        .expect("append to a new stream");
    assert!(
        matches!(outcome, AppendOutcome::Appended { new_version: 3, .. }),
        "append reports the new version: {outcome:?}"
    );
    let loaded = store.load(f.tenant, &stream).await.expect("load");
    assert_eq!(loaded.len(), 3, "load returns every appended event");
    for (i, (stored, written)) in loaded.iter().zip(&batch).enumerate() {
        assert_eq!(stored.version, i as u64 + 1, "versions start at 1");
        assert_eq!(stored.stream_id, stream);
        assert_eq!(stored.event_type, written.event_type);
        assert_eq!(stored.schema_version, written.schema_version);
        assert_eq!(stored.payload, written.payload, "payload round trip");
        assert_eq!(stored.metadata, written.metadata, "metadata round trip");
    }
    assert!(loaded.windows(2).all(|w| w[0].position < w[1].position));
    store
        .append(f.tenant, &stream, 3, vec![f.event("d")])
        .await
        .expect("append at the current version");
    assert_eq!(
        labels(&store.load(f.tenant, &stream).await.expect("load")),
        ["a", "b", "c", "d"]
    );
}

/// A stale or future expected version is a `Conflict` and writes nothing.
pub async fn expected_version_conflicts<S: EventStore>(store: &S) {
    let f = tenant();
    let stream = new_stream("Conformance");
    store
        .append(f.tenant, &stream, 0, vec![f.event("a"), f.event("b")])
        .await
        .expect("first append");
    for expected in [0, 1, 3, 10] {
        let err = store
            .append(
                f.tenant,
                &stream,
                expected,
                vec![f.event("x"), f.event("y")],
            )
            .await
            .expect_err("a wrong expected version must fail");
        assert!(
            matches!(err, StoreError::Conflict { expected: e, .. } if e == expected),
            "wrong expected version {expected} gives Conflict, got {err:?}"
        );
        assert!(err.is_conflict() && err.is_retryable());
    }
    assert_eq!(
        labels(&store.load(f.tenant, &stream).await.expect("load")),
        ["a", "b"],
        "a conflicting append writes nothing"
    );
}

/// Missing streams load empty; an empty append changes nothing.
pub async fn empty_and_missing_streams<S: EventStore>(store: &S) {
    let f = tenant();
    let stream = new_stream("Conformance");
    assert!(
        store
            .load(f.tenant, &stream)
            .await
            .expect("load")
            .is_empty()
    );
    let outcome = store
        .append(f.tenant, &stream, 0, Vec::new())
        .await
        .expect("empty append");
    assert!(
        matches!(
            outcome,
            AppendOutcome::Appended { new_version: 0, .. }
                | AppendOutcome::AlreadyApplied { stream_version: 0 }
        ),
        "empty append leaves the stream at version 0: {outcome:?}"
    );
    assert!(
        store
            .load(f.tenant, &stream)
            .await
            .expect("load")
            .is_empty()
    );
    assert!(
        store
            .read_all(f.tenant, 0, 100)
            .await
            .expect("read_all")
            .is_empty(),
        "a tenant with no events reads nothing"
    );
    // An event of another tenant is refused.
    let other = tenant();
    let err = store
        .append(f.tenant, &stream, 0, vec![other.event("x")])
        .await
        .expect_err("an event whose metadata names another tenant is refused");
    assert!(matches!(err, StoreError::InvalidAppend { .. }), "{err:?}");
}

/// `read_all` returns the tenant's events across streams in append order,
/// from any position, in pages.
pub async fn global_order_and_read_all_from_position<S: EventStore>(store: &S) {
    let f = tenant();
    let (s1, s2) = (new_stream("Conformance"), new_stream("Other"));
    store
        .append(f.tenant, &s1, 0, vec![f.event("1"), f.event("2")])
        .await
        .expect("append");
    store
        .append(f.tenant, &s2, 0, vec![f.event("3")])
        .await
        .expect("append");
    store
        .append(f.tenant, &s1, 2, vec![f.event("4")])
        .await
        .expect("append");
    store
        .append(f.tenant, &s2, 1, vec![f.event("5"), f.event("6")])
        .await
        .expect("append");
    let all = store.read_all(f.tenant, 0, 1000).await.expect("read_all");
    assert_eq!(labels(&all), ["1", "2", "3", "4", "5", "6"], "global order");
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let after_third = store
        .read_all(f.tenant, all[2].position, 1000)
        .await
        .expect("read_all from a position");
    assert_eq!(
        labels(&after_third),
        ["4", "5", "6"],
        "position is exclusive"
    );
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(f.tenant, after, 2).await.expect("page");
        assert!(page.len() <= 2, "limit is respected");
        let Some(last) = page.last() else { break };
        after = last.position;
        paged.extend(page);
    }
    assert_eq!(labels(&paged), labels(&all), "paging sees every event once");
}

/// A tenant never sees, extends or overwrites another tenant's streams.
pub async fn tenant_scoping<S: EventStore>(store: &S) {
    let (a, b) = (tenant(), tenant());
    let stream = new_stream("Conformance");
    store
        .append(a.tenant, &stream, 0, vec![a.event("secret")])
        .await
        .expect("append");
    assert!(
        store
            .load(b.tenant, &stream)
            .await
            .expect("load")
            .is_empty(),
        "another tenant's stream looks missing"
    );
    assert!(
        store
            .read_all(b.tenant, 0, 1000)
            .await
            .expect("read_all")
            .is_empty(),
        "read_all shows only the caller's tenant"
    );
    let res = store.append(b.tenant, &stream, 1, vec![b.event("x")]).await;
    assert!(res.is_err(), "appending to another tenant's stream fails");
    let res = store.append(b.tenant, &stream, 0, vec![b.event("y")]).await;
    assert!(res.is_err(), "claiming another tenant's stream id fails");
    assert_eq!(
        labels(&store.load(a.tenant, &stream).await.expect("load")),
        ["secret"],
        "the owner's stream is untouched"
    );
}

/// Retrying an append whose acknowledgement was lost is recognised.
pub async fn re_append_is_already_applied<S: EventStore>(store: &S) {
    let f = tenant();
    let stream = new_stream("Conformance");
    let batch = vec![f.event("a"), f.event("b")];
    store
        .append(f.tenant, &stream, 0, batch.clone())
        .await
        .expect("append");
    let outcome = store
        .append(f.tenant, &stream, 0, batch)
        .await
        .expect("a re-append of the same events is not an error");
    assert_eq!(outcome, AppendOutcome::AlreadyApplied { stream_version: 2 });
    assert_eq!(store.load(f.tenant, &stream).await.expect("load").len(), 2);
}

/// `writers` writers race to append to one stream from version 0, then each
/// loser reloads and retries until all have written once.
pub async fn concurrent_writers_on_one_stream<S: EventStore>(store: &S, writers: usize) {
    let f = tenant();
    let stream = new_stream("Conformance");
    let first_round = join_all((0..writers).map(|i| {
        let event = f.event(&format!("w{i}"));
        let stream = &stream;
        async move { store.append(f.tenant, stream, 0, vec![event]).await }
    }))
    .await;
    let winners = first_round.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "exactly one writer wins version 1");
    for r in &first_round {
        if let Err(e) = r {
            assert!(e.is_conflict(), "every loser gets Conflict, got {e:?}");
        }
    }
    let results = join_all((0..writers).map(|i| {
        let stream = &stream;
        let f = &f;
        async move {
            let event = f.event(&format!("retry{i}"));
            loop {
                let version = store.load(f.tenant, stream).await?.len() as u64;
                match store
                    .append(f.tenant, stream, version, vec![event.clone()])
                    .await
                {
                    Ok(_) => return Ok::<(), StoreError>(()),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }))
    .await;
    for r in results {
        r.expect("retries after conflicts succeed");
    }
    let loaded = store.load(f.tenant, &stream).await.expect("load");
    assert_eq!(loaded.len(), writers + 1, "nothing lost, nothing doubled");
    for (i, e) in loaded.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "versions stay contiguous");
    }
    let mut seen: Vec<_> = labels(&loaded);
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        writers + 1,
        "every writer's event is there once"
    );
}

/// The contract every [`WorkQueue`](crate::ports::WorkQueue) must pass,
/// on an empty queue that no one else uses while it runs. Leases are long
/// (an hour), so nothing here depends on timing; lapsed leases are each
/// adapter's own test, on its own clock.
///
/// # Panics
/// On the first broken rule, saying which.
pub async fn work_queue_conformance<Q: crate::ports::WorkQueue>(queue: &Q) {
    use crate::ids::VmRequestId;
    use std::time::Duration;
    const HOUR: Duration = Duration::from_secs(3600);
    let tenant = TenantId::from_uuid(Uuid::new_v4());
    let request = |_| VmRequestId::from_uuid(Uuid::new_v4());
    let [a, b, c]: [VmRequestId; 3] = std::array::from_fn(request);

    use crate::ports::QueueCounts;
    let counts = || async { queue.counts().await.expect("counts") };
    assert_eq!(counts().await, QueueCounts::default(), "an empty queue");

    for id in [a, b, c, a] {
        queue.enqueue(tenant, id).await.expect("enqueue");
    }
    assert_eq!(
        counts().await,
        QueueCounts {
            queued: 3,
            ..QueueCounts::default()
        },
        "three jobs due (a duplicate is one job)"
    );
    let first = queue.claim("w1", 2, HOUR).await.expect("claim");
    assert_eq!(first.len(), 2, "claim takes up to max: {first:?}");
    let second = queue.claim("w2", 10, HOUR).await.expect("claim");
    assert_eq!(
        second.len(),
        1,
        "an enqueued duplicate is one job, and leased jobs are not handed out again: {second:?}"
    );
    let mut seen: Vec<VmRequestId> = first.iter().chain(&second).map(|j| j.request_id).collect();
    seen.sort_by_key(|id| id.as_uuid());
    let mut all = vec![a, b, c];
    all.sort_by_key(|id| id.as_uuid());
    assert_eq!(seen, all, "every job is handed out exactly once");
    for job in first.iter().chain(&second) {
        assert_eq!(job.tenant_id, tenant);
        assert_eq!(job.attempts, 0, "a new job has no attempts: {job:?}");
        assert_eq!(job.claims, 1, "a first claim counts one: {job:?}");
    }
    assert!(
        queue.claim("w3", 10, HOUR).await.expect("claim").is_empty(),
        "nothing is left to claim while every job is leased"
    );

    let mine = first[0].request_id;
    let theirs = second[0].request_id;
    assert!(queue.renew("w1", mine, HOUR).await.expect("renew"));
    assert!(
        !queue.renew("w1", theirs, HOUR).await.expect("renew"),
        "only the holder renews"
    );

    // Only the holder completes, retries, postpones or releases.
    queue.complete("w1", theirs).await.expect("complete");
    queue.release("w1", theirs).await.expect("release");
    queue
        .retry_later("w1", theirs, Duration::ZERO)
        .await
        .expect("retry_later");
    queue
        .postpone("w1", theirs, Duration::ZERO)
        .await
        .expect("postpone");
    assert!(
        queue.renew("w2", theirs, HOUR).await.expect("renew"),
        "another worker's calls left w2's lease alone"
    );

    // Released: runnable again at once, no attempt counted.
    queue.release("w2", theirs).await.expect("release");
    let again = queue.claim("w3", 10, HOUR).await.expect("claim");
    assert_eq!(again.len(), 1, "a released job is runnable at once");
    assert_eq!(again[0].request_id, theirs);
    assert_eq!(again[0].attempts, 0, "releasing counts no attempt");
    assert_eq!(again[0].claims, 1, "giving a job back resets its claims");

    // Retried later: one attempt counted, not runnable before its delay.
    queue
        .retry_later("w3", theirs, HOUR)
        .await
        .expect("retry_later");
    assert!(
        queue.claim("w4", 10, HOUR).await.expect("claim").is_empty(),
        "a job retried in an hour is not runnable now"
    );
    // Postponed: not runnable before its delay either.
    let other = first[1].request_id;
    queue.postpone("w1", other, HOUR).await.expect("postpone");
    assert!(
        queue.claim("w4", 10, HOUR).await.expect("claim").is_empty(),
        "a job postponed by an hour is not runnable now"
    );
    assert_eq!(
        counts().await,
        QueueCounts {
            waiting: 2,
            leased: 1,
            ..QueueCounts::default()
        },
        "retried and postponed jobs wait; one is still leased"
    );

    // Completed: never handed out again, not even when enqueued again, and
    // purged only once old enough.
    queue.complete("w1", mine).await.expect("complete");
    queue.enqueue(tenant, mine).await.expect("enqueue");
    assert!(
        queue.claim("w5", 10, HOUR).await.expect("claim").is_empty(),
        "a finished job is not queued again"
    );
    // Requeued (its request was retried): a finished job runs again from
    // scratch; a job that is not finished is left as it is.
    queue.requeue(tenant, mine).await.expect("requeue");
    let rerun = queue.claim("w5", 10, HOUR).await.expect("claim");
    assert_eq!(
        rerun.iter().map(|j| j.request_id).collect::<Vec<_>>(),
        vec![mine],
        "a requeued job is runnable at once"
    );
    assert_eq!(
        (rerun[0].attempts, rerun[0].claims),
        (0, 1),
        "requeueing starts the job's counters afresh"
    );
    queue.requeue(tenant, mine).await.expect("requeue");
    assert!(
        queue.claim("w6", 10, HOUR).await.expect("claim").is_empty(),
        "requeueing a leased job leaves it leased"
    );
    assert!(
        queue.renew("w5", mine, HOUR).await.expect("renew"),
        "by its holder"
    );
    queue.complete("w5", mine).await.expect("complete");
    assert_eq!(
        counts().await,
        QueueCounts {
            waiting: 2,
            done: 1,
            ..QueueCounts::default()
        },
        "a completed job counts as done"
    );
    assert_eq!(
        queue.purge_finished(HOUR).await.expect("purge"),
        0,
        "a job finished just now is younger than an hour"
    );
    assert_eq!(
        queue.purge_finished(Duration::ZERO).await.expect("purge"),
        1,
        "only the finished job is purged"
    );
    assert!(
        !queue.renew("w3", theirs, HOUR).await.expect("renew"),
        "a job given back is no longer held"
    );
    assert_eq!(
        counts().await,
        QueueCounts {
            waiting: 2,
            ..QueueCounts::default()
        },
        "a purged job is no longer counted"
    );
}

/// The contract every [`CheckpointStore`](crate::ports::CheckpointStore)
/// must pass.
///
/// # Panics
/// On the first broken rule, saying which.
pub async fn checkpoint_conformance<C: crate::ports::CheckpointStore>(checkpoints: &C) {
    let t1 = TenantId::from_uuid(Uuid::new_v4());
    let t2 = TenantId::from_uuid(Uuid::new_v4());
    let name = format!("feed-{}", Uuid::new_v4().simple());
    assert_eq!(
        checkpoints.load(&name, t1).await.expect("load"),
        0,
        "nothing saved reads as 0"
    );
    checkpoints.save(&name, t1, 42).await.expect("save");
    assert_eq!(checkpoints.load(&name, t1).await.expect("load"), 42);
    checkpoints.save(&name, t1, 17).await.expect("save lower");
    assert_eq!(
        checkpoints.load(&name, t1).await.expect("load"),
        42,
        "a lower position is ignored"
    );
    checkpoints
        .save(&name, t1, u64::from(u32::MAX) + 7)
        .await
        .expect("save");
    assert_eq!(
        checkpoints.load(&name, t1).await.expect("load"),
        u64::from(u32::MAX) + 7,
        "positions beyond 32 bits round-trip"
    );
    assert_eq!(
        checkpoints.load(&name, t2).await.expect("load"),
        0,
        "checkpoints are per tenant"
    );
    assert_eq!(
        checkpoints.load("another-feed", t1).await.expect("load"),
        0,
        "checkpoints are per name"
    );
}

/// The contract every [`TimelineSink`](crate::ports::TimelineSink) must
/// pass.
///
/// # Panics
/// On the first broken rule, saying which.
pub async fn timeline_conformance<T: crate::ports::TimelineSink>(timeline: &T) {
    use crate::ids::VmRequestId;
    use crate::timeline::{TimelineEntry, TimelineEntryType};
    let tenant = TenantId::from_uuid(Uuid::new_v4());
    let other = TenantId::from_uuid(Uuid::new_v4());
    let request = VmRequestId::from_uuid(Uuid::new_v4());
    let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 123_456_789).unwrap();
    let entry = |entry_type, details: &str, s| TimelineEntry {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        tenant_id: tenant,
        request_id: request,
        entry_type,
        details: details.to_owned(),
        occurred_at: at(s),
        fields: crate::timeline::TimelineFields::default(),
    };
    let created = entry(TimelineEntryType::Created, "Request created", 0);
    let mut approved = entry(TimelineEntryType::Approved, "Approved – «ok» ✓", 5);
    approved.fields.actor = Some(crate::ids::UserId::from_uuid(Uuid::new_v4()));
    let mut ready = entry(TimelineEntryType::VmReady, "VM ready - IP: 10.0.0.7", 9);
    ready.fields.ip_address = Some("10.0.0.7".parse().expect("an IP"));
    ready.fields.vm_id = Some(crate::ids::VmId::from_uuid(Uuid::new_v4()));
    ready.fields.retryable = Some(false);
    // Recorded out of order, and one of them twice.
    for e in [&ready, &created, &approved, &ready] {
        timeline.record(e.clone()).await.expect("record");
    }
    let listed = timeline.list(tenant, request).await.expect("list");
    assert_eq!(
        listed,
        vec![created, approved, ready],
        "oldest first, each event once, every field (nanoseconds, text, structured fields) as recorded"
    );
    assert!(
        timeline
            .list(other, request)
            .await
            .expect("list")
            .is_empty(),
        "another tenant sees none of it"
    );
    assert!(
        timeline
            .list(tenant, VmRequestId::from_uuid(Uuid::new_v4()))
            .await
            .expect("list")
            .is_empty(),
        "another request has its own timeline"
    );
}

/// The contract every [`RequestReadModel`](crate::read_model::RequestReadModel)
/// must pass, on a model no one else writes to while it runs.
///
/// # Panics
/// On the first broken rule, saying which.
pub async fn read_model_conformance<R: crate::read_model::RequestReadModel>(model: &R) {
    use crate::ids::{ProjectId, VmRequestId};
    use crate::read_model::{Cursor, RequestFilter, RequestSummary};
    use crate::size::VmSize;
    use crate::vm_request::VmRequestStatus;
    let tenant = TenantId::from_uuid(Uuid::new_v4());
    let other = TenantId::from_uuid(Uuid::new_v4());
    let (web, db) = (
        ProjectId::from_uuid(Uuid::new_v4()),
        ProjectId::from_uuid(Uuid::new_v4()),
    );
    let base = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
    let row = |tenant, project, i: i64, status| RequestSummary {
        tenant_id: tenant,
        request_id: VmRequestId::from_uuid(Uuid::new_v4()),
        project_id: project,
        project_prefix: "web".into(),
        vm_name: format!("web-app{i:02}"),
        size: VmSize::S,
        status,
        vm_id: None,
        ip_address: None,
        reason: None,
        // Two rows per second: ties are ordered by request id.
        created_at: base + chrono::Duration::seconds(i / 2),
        updated_at: base,
        version: 1,
    };
    let mut rows = Vec::new();
    for i in 0..7 {
        let (project, status) = if i % 3 == 0 {
            (db, VmRequestStatus::Ready)
        } else {
            (web, VmRequestStatus::Pending)
        };
        rows.push(row(tenant, project, i, status));
    }
    for r in &rows {
        model.upsert(r.clone()).await.expect("upsert");
    }
    model
        .upsert(row(other, web, 0, VmRequestStatus::Pending))
        .await
        .expect("upsert");

    // Newer versions replace, older ones do not.
    let mut newer = rows[1].clone();
    newer.status = VmRequestStatus::Approved;
    newer.version = 3;
    newer.updated_at = base + chrono::Duration::seconds(60);
    model.upsert(newer.clone()).await.expect("upsert");
    let mut older = rows[1].clone();
    older.status = VmRequestStatus::Rejected;
    older.version = 2;
    model.upsert(older).await.expect("upsert");
    rows[1] = newer;

    let mut expected = rows.clone();
    expected.sort_by(|a, b| {
        (b.created_at, b.request_id.as_uuid()).cmp(&(a.created_at, a.request_id.as_uuid()))
    });

    // Page through everything, two at a time, cursors as text.
    let mut seen = Vec::new();
    let mut after: Option<Cursor> = None;
    for _ in 0..10 {
        let page = model
            .list(tenant, &RequestFilter::default(), after, 2)
            .await
            .expect("list");
        assert!(page.items.len() <= 2, "a page holds at most limit rows");
        seen.extend(page.items);
        match page.next {
            Some(next) => after = Some(next.to_string().parse().expect("a cursor reads back")),
            None => break,
        }
    }
    assert_eq!(
        seen, expected,
        "every row once, newest first, the newest version, nothing of another tenant"
    );

    let ready = model
        .list(
            tenant,
            &RequestFilter {
                status: Some(VmRequestStatus::Ready),
                ..RequestFilter::default()
            },
            None,
            100,
        )
        .await
        .expect("list");
    let want: Vec<_> = expected
        .iter()
        .filter(|r| r.status == VmRequestStatus::Ready)
        .cloned()
        .collect();
    assert_eq!(ready.items, want, "filtered by status");
    assert_eq!(ready.next, None);
    let in_web = model
        .list(
            tenant,
            &RequestFilter {
                project_id: Some(web),
                status: Some(VmRequestStatus::Pending),
            },
            None,
            100,
        )
        .await
        .expect("list");
    let want: Vec<_> = expected
        .iter()
        .filter(|r| r.project_id == web && r.status == VmRequestStatus::Pending)
        .cloned()
        .collect();
    assert_eq!(in_web.items, want, "filtered by project and status");
    assert_eq!(
        model
            .list(
                TenantId::from_uuid(Uuid::new_v4()),
                &RequestFilter::default(),
                None,
                10
            )
            .await
            .expect("list")
            .items,
        vec![],
        "a tenant without requests lists none"
    );
}

/// The contract every [`VspherePort`](crate::ports::VspherePort) must pass,
/// given a `spec` its vCenter can provision (an inventory that exists, a
/// folder path of the caller's own, a name no VM there has yet). The guest
/// need not report an IP: the spec's IP wait may be short.
///
/// - `create_vm` makes the VM and, called again with the same spec,
///   adopts it instead of making a second one (the VM carries the spec's
///   VM id);
/// - the same name with another VM id is `VsphereError::DuplicateName`,
///   never a second VM;
/// - `find_vm` finds it by the spec, with our id; `get_vm` reads it by its
///   vSphere id, powered on;
/// - `find_vm` of a name that does not exist is `None`;
/// - `power_off_vm` and `destroy_vm` with another owner's VM id are
///   `VsphereError::NotOurs` and leave the VM as it was (on, then off);
/// - `destroy_vm` of a VM still on is `VsphereError::InvalidPowerState`
///   and leaves it;
/// - `power_off_vm` turns the VM off; again, it is `AlreadyOff`;
/// - `destroy_vm` removes it: `get_vm` is then `VsphereError::VmGone`,
///   `find_vm` is `None`, and powering off or destroying it again is
///   `VmGone`.
///
/// # Panics
/// On the first broken rule, saying which.
pub async fn vsphere_conformance<V: crate::ports::VspherePort>(
    vsphere: &V,
    spec: crate::spec::VmSpec,
) {
    use crate::ports::VsphereError;
    use crate::spec::PowerState;
    let first = vsphere.create_vm(&spec).await.expect("create_vm");
    let again = vsphere
        .create_vm(&spec)
        .await
        .expect("create_vm again with the same spec");
    assert_eq!(
        again.vmware_vm_id, first.vmware_vm_id,
        "the same spec adopts the VM it made"
    );
    assert_eq!(first.hostname, spec.hostname.as_str());

    let mut foreign = spec.clone();
    foreign.vm_id = crate::ids::VmId::from_uuid(Uuid::new_v4());
    match vsphere.create_vm(&foreign).await {
        Err(VsphereError::DuplicateName { name, .. }) => assert_eq!(name, spec.name.as_str()),
        other => panic!("the same name with another VM id must be DuplicateName: {other:?}"),
    }

    let found = vsphere
        .find_vm(&spec)
        .await
        .expect("find_vm")
        .expect("the VM is found by its spec");
    assert_eq!(found.vmware_vm_id, first.vmware_vm_id);
    assert_eq!(found.dvmm_vm_id, Some(spec.vm_id), "it carries our VM id");
    assert_eq!(found.name, spec.name.as_str());
    let read = vsphere
        .get_vm(&spec.endpoint, &first.vmware_vm_id)
        .await
        .expect("get_vm");
    assert_eq!(read.vmware_vm_id, first.vmware_vm_id);
    assert_eq!(
        read.power_state,
        PowerState::PoweredOn,
        "provisioned VMs run"
    );

    let mut missing = spec.clone();
    missing.name =
        crate::spec::VmName::parse(&format!("nx-{}", &Uuid::new_v4().simple().to_string()[..8]))
            .expect("a valid name");
    assert!(
        vsphere.find_vm(&missing).await.expect("find_vm").is_none(),
        "no VM of that name"
    );

    power_off_and_destroy(vsphere, &spec, &first.vmware_vm_id).await;
}

/// The removal half of [`vsphere_conformance`], on the VM it made (on).
async fn power_off_and_destroy<V: crate::ports::VspherePort>(
    vsphere: &V,
    spec: &crate::spec::VmSpec,
    vm: &crate::ids::VmwareVmId,
) {
    use crate::ports::{PowerOffMode, PowerOffOutcome, VsphereError};
    use crate::spec::PowerState;
    let endpoint = &spec.endpoint;
    let owner = spec.vm_id;
    let stranger = crate::ids::VmId::from_uuid(Uuid::new_v4());
    let power = |expected: PowerState, why: &'static str| async move {
        let read = vsphere.get_vm(endpoint, vm).await.expect("get_vm");
        assert_eq!(read.power_state, expected, "{why}");
    };

    match vsphere
        .power_off_vm(endpoint, vm, stranger, PowerOffMode::Hard)
        .await
    {
        Err(VsphereError::NotOurs { vmware_vm_id }) => assert_eq!(vmware_vm_id, vm.as_str()),
        other => panic!("powering off with another owner's id must be NotOurs: {other:?}"),
    }
    power(PowerState::PoweredOn, "NotOurs left the VM on").await;
    match vsphere.destroy_vm(endpoint, vm, stranger).await {
        Err(VsphereError::NotOurs { .. }) => {}
        other => panic!("destroying with another owner's id must be NotOurs: {other:?}"),
    }
    match vsphere.destroy_vm(endpoint, vm, owner).await {
        Err(VsphereError::InvalidPowerState { .. }) => {}
        other => panic!("destroying a VM still on must be InvalidPowerState: {other:?}"),
    }
    power(
        PowerState::PoweredOn,
        "a refused destroy left the VM there, on",
    )
    .await;

    let off = vsphere
        .power_off_vm(endpoint, vm, owner, PowerOffMode::Hard)
        .await
        .expect("power_off_vm");
    assert_eq!(
        off,
        PowerOffOutcome::Hard,
        "a hard power-off of a VM that ran"
    );
    power(PowerState::PoweredOff, "powered off").await;
    let again = vsphere
        .power_off_vm(endpoint, vm, owner, PowerOffMode::Hard)
        .await
        .expect("power_off_vm again");
    assert_eq!(again, PowerOffOutcome::AlreadyOff, "a VM already off");

    match vsphere.destroy_vm(endpoint, vm, stranger).await {
        Err(VsphereError::NotOurs { .. }) => {}
        other => panic!("destroying another owner's VM (off) must be NotOurs: {other:?}"),
    }
    power(PowerState::PoweredOff, "NotOurs left the VM there").await;

    vsphere
        .destroy_vm(endpoint, vm, owner)
        .await
        .expect("destroy_vm");
    match vsphere.get_vm(endpoint, vm).await {
        Err(VsphereError::VmGone { vmware_vm_id }) => assert_eq!(vmware_vm_id, vm.as_str()),
        other => panic!("a destroyed VM must be VmGone: {other:?}"),
    }
    assert!(
        vsphere.find_vm(spec).await.expect("find_vm").is_none(),
        "a destroyed VM is not found by its spec"
    );
    match vsphere
        .power_off_vm(endpoint, vm, owner, PowerOffMode::Hard)
        .await
    {
        Err(VsphereError::VmGone { .. }) => {}
        other => panic!("powering off a destroyed VM must be VmGone: {other:?}"),
    }
    match vsphere.destroy_vm(endpoint, vm, owner).await {
        Err(VsphereError::VmGone { .. }) => {}
        other => panic!("destroying a destroyed VM again must be VmGone: {other:?}"),
    }
}
