#![doc = include_str!("../README.md")]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dvmm_core::clock::{Clock, SystemClock};
use dvmm_core::event::{NewEvent, StoredEvent, StreamId};
use dvmm_core::ids::{EventId, TenantId, VmRequestId};
use dvmm_core::ports::{
    AppendOutcome, BoxFuture, ClaimAttempt, ClaimHolder, EventStore, RequestClaims, StoreError,
    TimelineSink,
};
use dvmm_core::runner::{CheckpointStore, Job, QueueCounts, WorkQueue};
use dvmm_core::timeline::TimelineEntry;

#[derive(Default)]
struct Log {
    /// Every event in global order; `events[i].position == i + 1`.
    events: Vec<StoredEvent>,
    /// Stream → (owning tenant, indexes into `events`).
    streams: HashMap<StreamId, (TenantId, Vec<usize>)>,
    /// Tenant → indexes into `events`, for `read_all`.
    by_tenant: HashMap<TenantId, Vec<usize>>,
    event_ids: HashMap<EventId, StreamId>,
}

/// An in-memory [`EventStore`]: one mutex around an append-only log. Cheap to
/// clone behind an `Arc`, safe to share across tasks and threads.
#[derive(Default)]
pub struct MemoryEventStore {
    log: Mutex<Log>,
}

impl MemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave a half-written append:
        // appends validate first and then only push.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of events stored, across all tenants.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEventStore")
            .field("events", &self.len())
            .finish()
    }
}

impl EventStore for MemoryEventStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        if let Some(bad) = events.iter().find(|e| e.metadata.tenant_id != tenant) {
            return Err(StoreError::InvalidAppend {
                stream: stream.clone(),
                reason: format!(
                    "event {} belongs to tenant {}, not {tenant}",
                    bad.metadata.event_id, bad.metadata.tenant_id
                ),
            });
        }
        let mut log = self.lock();
        let current = match log.streams.get(stream) {
            Some((owner, _)) if *owner != tenant => {
                // Another tenant's stream: refuse without revealing it.
                return Err(StoreError::Conflict {
                    stream: stream.clone(),
                    expected: expected_version,
                    actual: None,
                });
            }
            Some((_, indexes)) => indexes.len() as u64,
            None => 0,
        };
        let known = events
            .iter()
            .filter(|e| log.event_ids.get(&e.metadata.event_id) == Some(stream))
            .count();
        if !events.is_empty() && known == events.len() {
            return Ok(AppendOutcome::AlreadyApplied {
                stream_version: current,
            });
        }
        if expected_version != current || known > 0 {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected: expected_version,
                actual: Some(current),
            });
        }
        if let Some(dup) = events
            .iter()
            .map(|e| e.metadata.event_id)
            .find(|id| log.event_ids.contains_key(id))
        {
            return Err(StoreError::InvalidAppend {
                stream: stream.clone(),
                reason: format!("event id {dup} is already stored in another stream"),
            });
        }
        let mut unique = HashSet::new();
        if !events.iter().all(|e| unique.insert(e.metadata.event_id)) {
            return Err(StoreError::InvalidAppend {
                stream: stream.clone(),
                reason: "the batch repeats an event id".into(),
            });
        }
        let mut version = current;
        for event in events {
            version += 1;
            let index = log.events.len();
            log.event_ids
                .insert(event.metadata.event_id, stream.clone());
            log.events.push(StoredEvent {
                position: index as u64 + 1,
                stream_id: stream.clone(),
                version,
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload,
                metadata: event.metadata,
            });
            log.streams
                .entry(stream.clone())
                .or_insert_with(|| (tenant, Vec::new()))
                .1
                .push(index);
            log.by_tenant.entry(tenant).or_default().push(index);
        }
        Ok(AppendOutcome::Appended {
            new_version: version,
            last_position: log.events.len() as u64,
        })
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let log = self.lock();
        Ok(match log.streams.get(stream) {
            Some((owner, indexes)) if *owner == tenant => {
                indexes.iter().map(|&i| log.events[i].clone()).collect()
            }
            _ => Vec::new(),
        })
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let log = self.lock();
        let Some(indexes) = log.by_tenant.get(&tenant) else {
            return Ok(Vec::new());
        };
        // Positions are index + 1 and increase along `indexes`.
        let start = indexes.partition_point(|&i| (i as u64) < after);
        Ok(indexes[start..]
            .iter()
            .take(limit)
            .map(|&i| log.events[i].clone())
            .collect())
    }
}

/// An in-memory [`TimelineSink`].
#[derive(Default, Debug)]
pub struct MemoryTimeline {
    entries: Mutex<TimelineEntries>,
}

#[derive(Default, Debug)]
struct TimelineEntries {
    by_request: HashMap<(TenantId, VmRequestId), Vec<TimelineEntry>>,
    seen: HashSet<EventId>,
}

impl MemoryTimeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }
}

impl TimelineSink for MemoryTimeline {
    async fn record(&self, entry: TimelineEntry) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.seen.insert(entry.event_id) {
            entries
                .by_request
                .entry((entry.tenant_id, entry.request_id))
                .or_default()
                .push(entry);
        }
        Ok(())
    }

    async fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = entries
            .by_request
            .get(&(tenant, request_id))
            .cloned()
            .unwrap_or_default();
        list.sort_by_key(|e| e.occurred_at);
        Ok(list)
    }
}

/// An in-memory [`WorkQueue`] for one process: jobs in arrival order, leases
/// and due times measured on a [`Clock`] (the system clock unless
/// [`MemoryWorkQueue::with_clock`] says otherwise, e.g. a test clock that
/// follows paused time).
pub struct MemoryWorkQueue {
    jobs: Mutex<QueueState>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryWorkQueue {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for MemoryWorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWorkQueue")
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

#[derive(Default, Debug)]
struct QueueState {
    order: Vec<VmRequestId>,
    jobs: HashMap<VmRequestId, QueuedJob>,
    done: usize,
}

#[derive(Debug)]
struct QueuedJob {
    tenant_id: TenantId,
    attempts: u32,
    /// Claims since the job was last given back.
    claims: u32,
    state: JobState,
}

#[derive(Debug, PartialEq)]
enum JobState {
    Queued {
        not_before: DateTime<Utc>,
    },
    Leased {
        worker: String,
        until: DateTime<Utc>,
    },
    Done {
        at: DateTime<Utc>,
    },
}

impl MemoryWorkQueue {
    /// An empty queue on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue whose leases and due times follow `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            jobs: Mutex::new(QueueState::default()),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `delay` from now; a delay too large to represent means "far future".
    fn after(&self, delay: Duration) -> DateTime<Utc> {
        let now = self.clock.now();
        chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// How many attempts the job has counted, if it is known.
    pub fn attempts(&self, request_id: VmRequestId) -> Option<u32> {
        self.lock().jobs.get(&request_id).map(|job| job.attempts)
    }

    /// Puts a held job back in the queue, due after `delay`, counting an
    /// attempt or not.
    fn requeue(&self, worker: &str, request_id: VmRequestId, delay: Duration, attempt: bool) {
        let not_before = self.after(delay);
        let mut state = self.lock();
        if let Some(job) = state.jobs.get_mut(&request_id)
            && matches!(&job.state, JobState::Leased { worker: w, .. } if w == worker)
        {
            if attempt {
                job.attempts += 1;
            }
            job.claims = 0;
            job.state = JobState::Queued { not_before };
        }
    }

    /// Jobs not done yet (queued or leased).
    pub fn pending(&self) -> usize {
        let state = self.lock();
        state.jobs.len() - state.done
    }
}

impl WorkQueue for MemoryWorkQueue {
    async fn enqueue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.jobs.contains_key(&request_id) {
            state.order.push(request_id);
            state.jobs.insert(
                request_id,
                QueuedJob {
                    tenant_id: tenant,
                    attempts: 0,
                    claims: 0,
                    state: JobState::Queued {
                        not_before: self.clock.now(),
                    },
                },
            );
        }
        Ok(())
    }

    async fn requeue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        match state.jobs.get_mut(&request_id) {
            Some(job) if matches!(job.state, JobState::Done { .. }) => {
                job.state = JobState::Queued { not_before: now };
                job.attempts = 0;
                job.claims = 0;
                state.done -= 1;
            }
            Some(_) => return Ok(()),
            None => {
                state.jobs.insert(
                    request_id,
                    QueuedJob {
                        tenant_id: tenant,
                        attempts: 0,
                        claims: 0,
                        state: JobState::Queued { not_before: now },
                    },
                );
            }
        }
        if !state.order.contains(&request_id) {
            state.order.push(request_id);
        }
        Ok(())
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        let now = self.clock.now();
        let until = self.after(lease);
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut claimed = Vec::new();
        // Done jobs are dropped from the scan order as they are met.
        let mut keep = Vec::with_capacity(state.order.len());
        for id in state.order.drain(..) {
            let Some(job) = state.jobs.get_mut(&id) else {
                continue;
            };
            let runnable = match &job.state {
                JobState::Queued { not_before } => *not_before <= now,
                JobState::Leased { until, .. } => *until <= now,
                JobState::Done { .. } => continue,
            };
            if runnable && claimed.len() < max {
                job.state = JobState::Leased {
                    worker: worker.to_owned(),
                    until,
                };
                job.claims = job.claims.saturating_add(1);
                claimed.push(Job {
                    tenant_id: job.tenant_id,
                    request_id: id,
                    attempts: job.attempts,
                    claims: job.claims,
                });
            }
            keep.push(id);
        }
        state.order = keep;
        Ok(claimed)
    }

    async fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let new_until = self.after(lease);
        let mut state = self.lock();
        Ok(match state.jobs.get_mut(&request_id) {
            Some(QueuedJob {
                state:
                    JobState::Leased {
                        worker: holder,
                        until,
                    },
                ..
            }) if holder == worker => {
                *until = new_until;
                true
            }
            _ => false,
        })
    }

    async fn complete(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        let at = self.clock.now();
        let mut state = self.lock();
        let finished = match state.jobs.get_mut(&request_id) {
            Some(job) if matches!(&job.state, JobState::Leased { worker: w, .. } if w == worker) => {
                job.state = JobState::Done { at };
                true
            }
            _ => false,
        };
        if finished {
            state.done += 1;
        }
        Ok(())
    }

    async fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.requeue(worker, request_id, delay, true);
        Ok(())
    }

    async fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.requeue(worker, request_id, delay, false);
        Ok(())
    }

    async fn release(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        self.requeue(worker, request_id, Duration::ZERO, false);
        Ok(())
    }

    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let cutoff = chrono::Duration::from_std(older_than)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut guard = self.lock();
        let state = &mut *guard;
        let before = state.jobs.len();
        state
            .jobs
            .retain(|_, job| !matches!(job.state, JobState::Done { at } if at <= cutoff));
        let purged = before - state.jobs.len();
        state.done -= purged;
        // Finished jobs already left the scan order when a claim met them;
        // any still listed are skipped there once their entry is gone.
        Ok(purged as u64)
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        let now = self.clock.now();
        let state = self.lock();
        let mut counts = QueueCounts::default();
        for job in state.jobs.values() {
            let count = match &job.state {
                JobState::Queued { not_before } if *not_before <= now => &mut counts.queued,
                JobState::Queued { .. } => &mut counts.waiting,
                JobState::Leased { until, .. } if *until > now => &mut counts.leased,
                JobState::Leased { .. } => &mut counts.expired,
                JobState::Done { .. } => &mut counts.done,
            };
            *count += 1;
        }
        Ok(counts)
    }
}

/// A request's claim is its job's lease: a runner that leased the job holds
/// it, and a direct caller that takes it leases the job (adding it when the
/// feed has not yet), so runners and callers of one process exclude each
/// other.
impl RequestClaims for MemoryWorkQueue {
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>> {
        Box::pin(async move {
            let now = self.clock.now();
            let until = self.after(lease);
            let mut guard = self.lock();
            let state = &mut *guard;
            let job = state.jobs.entry(request_id).or_insert_with(|| QueuedJob {
                tenant_id: tenant,
                attempts: 0,
                claims: 0,
                state: JobState::Queued { not_before: now },
            });
            let attempt = match &job.state {
                JobState::Leased {
                    worker,
                    until: held,
                } if *held > now => {
                    if worker == holder {
                        ClaimAttempt::AlreadyHeld { until }
                    } else {
                        return Ok(ClaimAttempt::HeldBy(ClaimHolder {
                            holder: worker.clone(),
                            until: *held,
                        }));
                    }
                }
                _ => ClaimAttempt::Acquired { until },
            };
            if matches!(job.state, JobState::Done { .. }) {
                state.done -= 1;
            }
            // Counted like a runner's claim (PostgreSQL does the same), so a
            // request whose callers keep dying is abandoned after
            // `max_claims`; re-entering one's own claim is not a new claim.
            if matches!(attempt, ClaimAttempt::Acquired { .. }) {
                job.claims += 1;
            }
            job.state = JobState::Leased {
                worker: holder.to_owned(),
                until,
            };
            if !state.order.contains(&request_id) {
                state.order.push(request_id);
            }
            Ok(attempt)
        })
    }

    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.renew(holder, request_id, lease))
    }

    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if finished {
                self.complete(holder, request_id).await
            } else {
                self.release(holder, request_id).await
            }
        })
    }
}

/// An in-memory [`CheckpointStore`].
#[derive(Default, Debug)]
pub struct MemoryCheckpoints {
    positions: Mutex<HashMap<(String, TenantId), u64>>,
}

impl MemoryCheckpoints {
    /// No checkpoints.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CheckpointStore for MemoryCheckpoints {
    async fn load(&self, name: &str, tenant: TenantId) -> Result<u64, StoreError> {
        let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        Ok(positions
            .get(&(name.to_owned(), tenant))
            .copied()
            .unwrap_or(0))
    }

    async fn save(&self, name: &str, tenant: TenantId, position: u64) -> Result<(), StoreError> {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let slot = positions.entry((name.to_owned(), tenant)).or_insert(0);
        *slot = (*slot).max(position);
        Ok(())
    }
}

/// The request read model in memory (see
/// [`dvmm_core::read_model::RequestReadModel`]).
#[derive(Debug, Default)]
pub struct MemoryRequests {
    rows: Mutex<HashMap<(TenantId, VmRequestId), dvmm_core::read_model::RequestSummary>>,
}

impl MemoryRequests {
    /// An empty read model.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(
        &self,
    ) -> MutexGuard<'_, HashMap<(TenantId, VmRequestId), dvmm_core::read_model::RequestSummary>>
    {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl dvmm_core::read_model::RequestReadModel for MemoryRequests {
    fn upsert<'a>(
        &'a self,
        row: dvmm_core::read_model::RequestSummary,
    ) -> dvmm_core::ports::BoxFuture<'a, Result<(), StoreError>> {
        let mut rows = self.lock();
        let key = (row.tenant_id, row.request_id);
        if rows.get(&key).is_none_or(|old| old.version < row.version) {
            rows.insert(key, row);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn list<'a>(
        &'a self,
        tenant: TenantId,
        filter: &'a dvmm_core::read_model::RequestFilter,
        after: Option<dvmm_core::read_model::Cursor>,
        limit: usize,
    ) -> dvmm_core::ports::BoxFuture<
        'a,
        Result<dvmm_core::read_model::Page<dvmm_core::read_model::RequestSummary>, StoreError>,
    > {
        let rows: Vec<_> = self
            .lock()
            .values()
            .filter(|row| row.tenant_id == tenant)
            .cloned()
            .collect();
        Box::pin(std::future::ready(Ok(dvmm_core::read_model::page_of(
            rows, filter, after, limit,
        ))))
    }
}
