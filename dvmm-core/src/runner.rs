//! The background provisioning runner: turns every `VmRequestApproved` into
//! a provisioning, across restarts and across worker processes.
//!
//! - A *feed* follows each tenant's events from a stored checkpoint and puts
//!   every approved request into a [`WorkQueue`]; the checkpoint advances only
//!   after the queue has the work, so nothing is skipped.
//! - Workers *claim* jobs with a lease, run [`ProvisioningService::provision_attempt`]
//!   (up to `concurrency` at once on one task), renew the leases while the
//!   work runs and complete the job once its outcome is recorded. A worker
//!   that dies stops renewing; its lease expires and another worker claims
//!   the job and resumes the request, adopting the VM already created.
//! - Retryable failures *about the request* (a task that timed out or
//!   failed, …) are retried with exponential backoff and jitter up to
//!   `max_attempts`; the last attempt records the failure.
//! - An unreachable vCenter ([`VsphereError::is_unavailable`]) costs time,
//!   not attempts: the runner *parks* that endpoint (keyed by
//!   [`crate::config::VcenterEndpoint::key`]). While it is parked, claimed
//!   jobs of tenants on it are not attempted: they are postponed (no attempt
//!   counted) after the request records that it waits ("Waiting for
//!   vCenter", once per outage), except one *probe* job per backoff delay
//!   ([`RunnerConfig::backoff`] over the outage). The probe first asks
//!   vCenter something cheap ([`ProvisioningService::check_vcenter`]); when
//!   it answers, the endpoint is unparked at once and the probe goes on as
//!   an ordinary attempt. Jobs claimed while a probe runs are held (their
//!   leases renewed) so that they start the moment it gets through; any
//!   attempt that reaches vCenter unparks it too. Other endpoints' work goes
//!   on throughout. A request that waits longer than its tenant's
//!   `timeouts.unavailable_deadline_secs` fails, saying since when vCenter
//!   was unreachable.
//! - Poison stays local: the feed reads each tenant on its own; an approval
//!   it cannot read is logged, counted and skipped, and an event written by
//!   a newer release stops only that tenant's feed ("upgrade dvmm"). See
//!   [`FeedReport`] for the rule.
//! - Shutdown stops claiming, lets in-flight work finish until a deadline, then
//!   cancels and releases what is left for another worker.
//!
//! The runner is runtime-agnostic: waiting goes through the [`Timer`] port.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::{AbortHandle, Abortable, Aborted};
use futures::stream::{FuturesUnordered, StreamExt};
use tracing::{debug, error, info, warn};

use crate::Aggregate;
use crate::backoff::Backoff;
use crate::clock::{Clock, IdGenerator};
use crate::event::{DomainEvent, EventDecodeError, StoredEvent, StreamId};
use crate::ids::{TenantId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VsphereError, VspherePort};
use crate::provisioning::{ProvisionOutcome, ProvisioningService, ServiceError};
use crate::telemetry;
use crate::vm_request::{VmRequest, VmRequestEvent, VmRequestStatus};

pub use crate::ports::{CheckpointStore, Job, QueueCounts, Timer, WorkQueue};

/// How a runner behaves.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Checkpoint name, shared by all workers of one deployment.
    pub name: String,
    /// This worker's id (unique per process).
    pub worker_id: String,
    /// Provisionings run at once by this worker (default 8: vCenter limits
    /// concurrent provisioning operations per host).
    pub concurrency: usize,
    /// How long a claim lasts without renewal (default 30 s).
    pub lease: Duration,
    /// How often to look for new work (default 250 ms). Leases are renewed
    /// every quarter lease.
    pub poll_interval: Duration,
    /// Attempts before a retryable failure is recorded (default 5).
    pub max_attempts: u32,
    /// Delay before retrying a request (default 1 s doubling up to 60 s,
    /// with jitter), and between probes of a parked (unreachable) vCenter,
    /// counted over the outage.
    pub backoff: Backoff,
    /// How long shutdown waits for in-flight work (default 30 s).
    pub shutdown_deadline: Duration,
    /// Claims in a row that may end without the job being finished or
    /// given back (the worker died or hung, its lease ran out) before the
    /// request is failed, saying so (default 5). A job that crashes every
    /// worker that takes it must not be claimed forever.
    pub max_claims: u32,
    /// Feed or claim rounds in a row that may fail on the store before
    /// [`ProvisioningRunner::run`] gives up and returns the error (default
    /// 30). Between them the runner backs off with [`RunnerConfig::backoff`].
    pub max_store_failures: u32,
    /// How long finished jobs are kept in the queue before they are purged
    /// (default 7 days). While kept, a re-read approval is not queued again;
    /// after, it would be, and the provisioning would find nothing to do.
    pub retention: Duration,
    /// How often finished jobs past the retention are purged (default 1 h).
    pub purge_interval: Duration,
    /// How often the queue's depth per state is read
    /// ([`WorkQueue::counts`], one query) for the `dvmm_queue_jobs` gauge
    /// and [`RunnerHealth::queue`] (default 10 s): a bounded rate, however
    /// much work flows.
    pub queue_depth_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            name: "provisioning".into(),
            worker_id: format!("worker-{}", uuid::Uuid::new_v4()),
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            max_attempts: 5,
            backoff: Backoff::default(),
            shutdown_deadline: Duration::from_secs(30),
            max_claims: 5,
            max_store_failures: 30,
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
            queue_depth_interval: Duration::from_secs(10),
        }
    }
}

/// A [`RunnerConfig`] value is out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid runner configuration: {field}: {reason}")]
pub struct RunnerConfigError {
    /// The field, e.g. `lease`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Shortest lease: leases are renewed every quarter lease, and a renewal
/// is a store round trip that must fit in that quarter.
pub const MIN_LEASE: Duration = Duration::from_millis(100);
/// Longest lease: a dead worker's jobs wait this long for a takeover.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest of the other intervals and deadlines of a [`RunnerConfig`]: far
/// enough for any deployment, near enough that no deadline computed from
/// them overflows.
pub const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

impl RunnerConfig {
    /// Checks every value; [`ProvisioningRunner::new`] calls this.
    ///
    /// # Errors
    /// A [`RunnerConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), RunnerConfigError> {
        let bad = |field: &'static str, reason: String| Err(RunnerConfigError { field, reason });
        if self.name.trim().is_empty() {
            return bad("name", "must not be empty".into());
        }
        if self.worker_id.trim().is_empty() {
            return bad("worker_id", "must not be empty".into());
        }
        if !(1..=4096).contains(&self.concurrency) {
            return bad(
                "concurrency",
                format!("must be between 1 and 4096, got {}", self.concurrency),
            );
        }
        if !(MIN_LEASE..=MAX_LEASE).contains(&self.lease) {
            return bad(
                "lease",
                format!(
                    "must be between {MIN_LEASE:?} and {MAX_LEASE:?}, got {:?}: it is renewed every quarter lease, so it must stay well above one store round trip",
                    self.lease
                ),
            );
        }
        if self.poll_interval.is_zero() || self.poll_interval > self.lease {
            return bad(
                "poll_interval",
                format!(
                    "must be above zero and at most the lease ({:?}), got {:?}",
                    self.lease, self.poll_interval
                ),
            );
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if self.max_claims < 2 {
            return bad(
                "max_claims",
                format!(
                    "must be at least 2 (one worker may die and another take over), got {}",
                    self.max_claims
                ),
            );
        }
        if self.max_store_failures == 0 {
            return bad("max_store_failures", "must be at least 1".into());
        }
        if self.shutdown_deadline > MAX_INTERVAL {
            return bad(
                "shutdown_deadline",
                format!("must be at most {MAX_INTERVAL:?}"),
            );
        }
        if self.retention < Duration::from_secs(60) || self.retention > MAX_INTERVAL {
            return bad(
                "retention",
                format!(
                    "must be between 1 minute and {MAX_INTERVAL:?}, got {:?}",
                    self.retention
                ),
            );
        }
        if self.purge_interval < Duration::from_secs(1) || self.purge_interval > MAX_INTERVAL {
            return bad(
                "purge_interval",
                format!(
                    "must be between 1 s and {MAX_INTERVAL:?}, got {:?}",
                    self.purge_interval
                ),
            );
        }
        if self.queue_depth_interval < Duration::from_millis(100)
            || self.queue_depth_interval > MAX_INTERVAL
        {
            return bad(
                "queue_depth_interval",
                format!(
                    "must be between 100 ms and {MAX_INTERVAL:?}, got {:?}",
                    self.queue_depth_interval
                ),
            );
        }
        Ok(())
    }
}

/// What a runner did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunnerReport {
    /// Requests that ended `Ready`.
    pub ready: u64,
    /// Requests whose failure was recorded.
    pub failed: u64,
    /// Jobs that needed nothing (already provisioned, rejected, …).
    pub skipped: u64,
    /// Attempts that will be retried later.
    pub retried: u64,
    /// Jobs given back at shutdown or after a lost lease.
    pub released: u64,
    /// Times a job was given back without counting an attempt because its
    /// vCenter could not be reached.
    pub waited: u64,
    /// Finished jobs purged from the queue after
    /// [`RunnerConfig::retention`].
    pub purged: u64,
    /// Requests failed because their job kept being claimed without
    /// finishing ([`RunnerConfig::max_claims`]); also counted in `failed`.
    pub abandoned: u64,
    /// Events the feed could not read, recorded and skipped (see
    /// [`FeedReport`]).
    pub poison_events: u64,
    /// Tenants whose feed stood still at the last look, at an event written
    /// by a newer release (see [`FeedReport`]).
    pub stopped_feeds: u64,
}

/// What a running runner is doing, for a host's health endpoint: see
/// [`ProvisioningRunner::health`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunnerHealth {
    /// Whether [`ProvisioningRunner::run`] is running (false before it
    /// starts and after it returns).
    pub running: bool,
    /// Provisionings (and probes) under way.
    pub in_flight: usize,
    /// Jobs claimed but waiting here: for a free slot, or for their
    /// vCenter to come back.
    pub held: usize,
    /// vCenter endpoints parked as unreachable.
    pub parked_endpoints: usize,
    /// Jobs per state in the whole queue (every worker's), as last read
    /// (every [`RunnerConfig::queue_depth_interval`], and once more when
    /// the runner stops); `None` before the first read answered.
    pub queue: Option<QueueCounts>,
    /// Feed or claim failures in a row (0 when the store answers).
    pub store_failures: u32,
    /// The last error met (store failures and failed provisioning
    /// commands), with when; outcomes recorded on requests are not errors.
    pub last_error: Option<(DateTime<Utc>, String)>,
    /// Totals since the run started.
    pub report: RunnerReport,
}

/// An event the feed could not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoisonEvent {
    /// Tenant.
    pub tenant: TenantId,
    /// Its stream.
    pub stream: StreamId,
    /// Its global position.
    pub position: u64,
    /// Why it could not be read.
    pub reason: String,
}

/// What one pass of [`ProvisioningRunner::feed`] did.
///
/// The feed acts on `VmRequestApproved` events of request streams (and on
/// `VmRequestRetried`, which puts a failed request's job back). The rule
/// for events it cannot read:
///
/// - An event of a request stream with a *newer schema version* than this
///   release knows for its type was written by a newer dvmm (a rolling
///   upgrade): that tenant's feed stops just before it (its checkpoint does
///   not pass it) and resumes by itself once a release that reads it runs;
///   an error saying "upgrade dvmm" is logged once. Other tenants go on.
/// - An approval this release should read but cannot (a malformed payload,
///   a missing upcaster, a stream id that is no request id) is *poison*: it
///   is logged at error level with its stream, position and why, counted,
///   and skipped; the checkpoint moves on and the request is not
///   provisioned by the runner (a host can still call `provision` once the
///   data is repaired).
/// - Other events are not the feed's business and are not decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedReport {
    /// Jobs offered to the queue.
    pub offered: usize,
    /// Events recorded and skipped.
    pub poisoned: Vec<PoisonEvent>,
    /// Tenants whose feed stops at an event of a newer release, with it.
    pub stopped: Vec<PoisonEvent>,
}

/// What the feed does with one event.
enum Feed {
    Ignore,
    Enqueue(VmRequestId),
    /// A failed request was retried: its finished job runs again.
    Requeue(VmRequestId),
    Poison(String),
    Stop(String),
}

fn feed_event(stored: &StoredEvent) -> Feed {
    if stored.stream_id.stream_type != VmRequest::STREAM_TYPE {
        return Feed::Ignore;
    }
    if let Some(supported) = VmRequestEvent::current_version(&stored.event_type)
        && stored.schema_version > supported
    {
        return Feed::Stop(format!(
            "event {} has schema version {}, newer than the {supported} this release reads",
            stored.event_type, stored.schema_version
        ));
    }
    if stored.event_type != "VmRequestApproved" && stored.event_type != "VmRequestRetried" {
        return Feed::Ignore;
    }
    let retried = match VmRequestEvent::decode(stored) {
        Ok(VmRequestEvent::VmRequestApproved(_)) => false,
        Ok(VmRequestEvent::VmRequestRetried(_)) => true,
        Ok(_) => return Feed::Poison("decoded to another event type".into()),
        Err(EventDecodeError::FutureVersion { .. }) => {
            // Checked above; kept for an upcaster chain that says so itself.
            return Feed::Stop("written by a newer release".into());
        }
        Err(error) => return Feed::Poison(error.to_string()),
    };
    match stored.stream_id.id.parse() {
        Ok(request_id) if retried => Feed::Requeue(request_id),
        Ok(request_id) => Feed::Enqueue(request_id),
        Err(_) => Feed::Poison(format!(
            "stream id {:?} is not a request id",
            stored.stream_id.id
        )),
    }
}

/// The background runner. See the [module docs](self).
pub struct ProvisioningRunner<S, V, T, C, I, Q, K, W> {
    service: Arc<ProvisioningService<S, V, T, C, I>>,
    queue: Q,
    checkpoints: K,
    timer: W,
    config: RunnerConfig,
    /// Where each stopped tenant's feed stops (see [`FeedReport`]).
    stops: std::sync::Mutex<HashMap<TenantId, u64>>,
    health: std::sync::Mutex<RunnerHealth>,
}

impl<S, V, T, C, I, Q, K, W> fmt::Debug for ProvisioningRunner<S, V, T, C, I, Q, K, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a job runs.
#[derive(Clone, Debug)]
enum JobKind {
    /// A provisioning attempt, which calls vSphere.
    Attempt,
    /// Records that the request waits for its parked vCenter (and fails it
    /// past its deadline) without calling vSphere.
    Wait(VsphereError),
    /// Probes a parked vCenter with a cheap read first: when it answers,
    /// the runner hears at once (the endpoint's other work starts) and the
    /// job goes on as an attempt; otherwise the request waits.
    Probe,
    /// Fails the request without calling vSphere: its job was claimed this
    /// many times in a row without finishing.
    Abandon(u32),
}

type JobResult = (
    Job,
    JobKind,
    Result<Result<ProvisionOutcome, ServiceError>, Aborted>,
);

/// A vCenter that could not be reached, and when to try it again.
#[derive(Debug)]
struct Park {
    /// When this runner first found it unreachable.
    since: DateTime<Utc>,
    /// Failed probes (and the attempt that parked it) in this outage.
    failures: u32,
    /// When the next probe may start.
    next_probe: DateTime<Utc>,
    /// The job probing it right now.
    probe: Option<VmRequestId>,
    /// What the last attempt met.
    error: VsphereError,
}

/// The parked endpoints, by [`crate::config::VcenterEndpoint::key`].
#[derive(Debug, Default)]
struct Parks {
    by_endpoint: HashMap<String, Park>,
    /// Endpoints unparked lately: (when, the outage's failures and start).
    /// A vCenter that answers a probe but fails the work again at once
    /// (half up, a flapping proxy) keeps backing off instead of starting
    /// over at the shortest delay each time.
    recent: HashMap<String, (DateTime<Utc>, u32, DateTime<Utc>)>,
}

/// Store failures in a row of the feed and the claims, and when to try the
/// store again: the runner backs off instead of hammering a store that is
/// down, and gives up after [`RunnerConfig::max_store_failures`].
#[derive(Debug, Default)]
struct StoreFailures {
    count: u32,
    retry_at: Option<DateTime<Utc>>,
}

impl StoreFailures {
    fn ready(&self, now: DateTime<Utc>) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    fn ok(&mut self) {
        self.count = 0;
        self.retry_at = None;
    }

    /// Counts a failure; the error back when it was one too many.
    fn failed(
        &mut self,
        what: &str,
        error: ServiceError,
        now: DateTime<Utc>,
        config: &RunnerConfig,
    ) -> Option<ServiceError> {
        self.count = self.count.saturating_add(1);
        if self.count >= config.max_store_failures {
            error!(%error, failures = self.count, "{what} failed too many times in a row; the runner stops");
            return Some(error);
        }
        let delay = config.backoff.delay(self.count);
        warn!(%error, failures = self.count, ?delay, "{what} failed; trying again after a backoff");
        self.retry_at = Some(after(now, delay));
        None
    }
}

/// What to do with a claimed job.
enum Dispatch {
    Start(Job, JobKind),
    Hold(Job),
}

fn after(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Parks {
    /// An attempt against `endpoint` met an unavailable vCenter. Parks it,
    /// or counts a failed probe; returns how long the job should wait.
    fn unavailable(
        &mut self,
        endpoint: &str,
        job: VmRequestId,
        error: &VsphereError,
        now: DateTime<Utc>,
        backoff: &Backoff,
    ) -> Duration {
        let recent = self.recent.remove(endpoint);
        let park = self
            .by_endpoint
            .entry(endpoint.to_owned())
            .or_insert_with(|| {
                let (failures, since) = match recent {
                    Some((unparked, failures, since))
                        if (now - unparked).to_std().unwrap_or_default() <= backoff.max() =>
                    {
                        (failures.saturating_add(1), since)
                    }
                    _ => (1, now),
                };
                let delay = backoff.delay(failures);
                warn!(endpoint, %error, ?delay, failures, "vCenter unreachable; parking its work");
                Park {
                    since,
                    failures,
                    next_probe: after(now, delay),
                    probe: None,
                    error: error.clone(),
                }
            });
        if park.probe == Some(job) {
            park.failures = park.failures.saturating_add(1);
            let delay = backoff.delay(park.failures);
            park.next_probe = after(now, delay);
            park.probe = None;
            park.error = error.clone();
            info!(endpoint, %error, failures = park.failures, since = %park.since, ?delay, "vCenter still unreachable");
        }
        (park.next_probe - now).to_std().unwrap_or_default()
    }

    /// `endpoint` answered: its work may go on.
    fn reachable(&mut self, endpoint: &str, now: DateTime<Utc>) {
        if let Some(park) = self.by_endpoint.remove(endpoint) {
            info!(endpoint, since = %park.since, "vCenter reachable again; resuming its work");
            self.recent
                .insert(endpoint.to_owned(), (now, park.failures, park.since));
        }
    }

    /// A provisioning on `endpoint` went all the way through: it is really
    /// back, so a later failure starts a new outage.
    fn worked(&mut self, endpoint: &str) {
        self.recent.remove(endpoint);
    }

    /// `job` ended without telling whether `endpoint` is back (skipped,
    /// store failure, lease lost): if it was the probe, another job probes.
    fn inconclusive(&mut self, endpoint: &str, job: VmRequestId) {
        if let Some(park) = self.by_endpoint.get_mut(endpoint)
            && park.probe == Some(job)
        {
            park.probe = None;
        }
    }

    /// What to do with a job of `endpoint` claimed now.
    fn dispatch(
        &mut self,
        endpoint: Option<&str>,
        job: Job,
        now: DateTime<Utc>,
        can_hold: bool,
    ) -> Dispatch {
        let Some(park) = endpoint.and_then(|e| self.by_endpoint.get_mut(e)) else {
            return Dispatch::Start(job, JobKind::Attempt);
        };
        match park.probe {
            None if now >= park.next_probe => {
                debug!(request_id = %job.request_id, "probing a parked vCenter");
                park.probe = Some(job.request_id);
                Dispatch::Start(job, JobKind::Probe)
            }
            Some(_) if can_hold => Dispatch::Hold(job),
            _ => Dispatch::Start(job, JobKind::Wait(park.error.clone())),
        }
    }

    /// How long a job of `endpoint` that waits should stay away: until the
    /// next probe, or one backoff step while a probe runs.
    fn wait_delay(
        &self,
        endpoint: Option<&str>,
        now: DateTime<Utc>,
        backoff: &Backoff,
    ) -> Option<Duration> {
        let park = self.by_endpoint.get(endpoint?)?;
        Some(if park.probe.is_some() || park.next_probe <= now {
            backoff.delay(park.failures.saturating_add(1))
        } else {
            (park.next_probe - now).to_std().unwrap_or_default()
        })
    }

    fn is_parked(&self, endpoint: Option<&str>) -> bool {
        endpoint.is_some_and(|e| self.by_endpoint.contains_key(e))
    }
}

impl<S, V, T, C, I, Q, K, W> ProvisioningRunner<S, V, T, C, I, Q, K, W>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
    Q: WorkQueue,
    K: CheckpointStore,
    W: Timer,
{
    /// A runner for `service`.
    ///
    /// # Errors
    /// A [`RunnerConfigError`] when `config` does not pass
    /// [`RunnerConfig::validate`].
    pub fn new(
        service: Arc<ProvisioningService<S, V, T, C, I>>,
        queue: Q,
        checkpoints: K,
        timer: W,
        config: RunnerConfig,
    ) -> Result<Self, RunnerConfigError> {
        config.validate()?;
        Ok(Self {
            service,
            queue,
            checkpoints,
            timer,
            config,
            stops: std::sync::Mutex::new(HashMap::new()),
            health: std::sync::Mutex::default(),
        })
    }

    /// A snapshot of what the runner is doing; cheap, and safe to call from
    /// another task while [`run`](Self::run) runs (it is updated once per
    /// turn of the runner's loop).
    pub fn health(&self) -> RunnerHealth {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update_health(&self, update: impl FnOnce(&mut RunnerHealth)) {
        update(&mut self.health.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn note_error(&self, error: &dyn fmt::Display) {
        let at = self.service.clock().now();
        self.update_health(|h| h.last_error = Some((at, error.to_string())));
    }

    /// The configuration.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// Reads new events of every tenant and queues the approved requests.
    ///
    /// Tenants are fed independently: what goes wrong in one tenant's
    /// events never holds up another's. See [`FeedReport`] for what happens
    /// to an event the feed cannot read.
    ///
    /// # Errors
    /// The first store failure met (the tenants after it were still fed;
    /// the failing tenant's checkpoint stays where it was).
    pub async fn feed(&self) -> Result<FeedReport, ServiceError> {
        let mut report = FeedReport::default();
        self.feed_into(&mut report).await.map(|()| report)
    }

    async fn feed_into(&self, report: &mut FeedReport) -> Result<(), ServiceError> {
        let mut first_error = None;
        let tenants: Vec<TenantId> = self.service.tenants().ids().collect();
        for tenant in tenants {
            if let Err(error) = self.feed_tenant(tenant, report).await {
                warn!(%tenant, %error, "feeding this tenant's work failed; will retry");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn feed_tenant(
        &self,
        tenant: TenantId,
        report: &mut FeedReport,
    ) -> Result<(), ServiceError> {
        let mut after = self.checkpoints.load(&self.config.name, tenant).await?;
        loop {
            let page = self.service.store().read_all(tenant, after, 500).await?;
            let Some(last) = page.last() else { break };
            let mut last = last.position;
            let mut stopped = false;
            for stored in &page {
                match feed_event(stored) {
                    Feed::Ignore => {}
                    Feed::Enqueue(request_id) => {
                        self.queue.enqueue(tenant, request_id).await?;
                        report.offered += 1;
                    }
                    // Fed again after a crash, a retry requeues a job that
                    // may have finished since: its rerun finds nothing to
                    // do, so that costs a claim, not a second VM.
                    Feed::Requeue(request_id) => {
                        self.queue.requeue(tenant, request_id).await?;
                        report.offered += 1;
                    }
                    Feed::Poison(reason) => {
                        error!(
                            %tenant,
                            stream = %stored.stream_id,
                            position = stored.position,
                            event_type = %stored.event_type,
                            schema_version = stored.schema_version,
                            reason = %reason,
                            "skipping an event the provisioning feed cannot read"
                        );
                        report.poisoned.push(PoisonEvent {
                            tenant,
                            stream: stored.stream_id.clone(),
                            position: stored.position,
                            reason,
                        });
                    }
                    Feed::Stop(reason) => {
                        let newly = self.note_stop(tenant, stored.position);
                        if newly {
                            error!(
                                %tenant,
                                stream = %stored.stream_id,
                                position = stored.position,
                                reason = %reason,
                                "this tenant's provisioning feed stops here: upgrade dvmm (a newer release wrote this event)"
                            );
                        }
                        report.stopped.push(PoisonEvent {
                            tenant,
                            stream: stored.stream_id.clone(),
                            position: stored.position,
                            reason,
                        });
                        // Everything before it is done; it and what follows
                        // wait for a release that can read them.
                        last = stored.position.saturating_sub(1);
                        stopped = true;
                        break;
                    }
                }
            }
            if last > after {
                self.checkpoints
                    .save(&self.config.name, tenant, last)
                    .await?;
            }
            if stopped {
                return Ok(());
            }
            after = last;
        }
        self.clear_stop(tenant);
        Ok(())
    }

    /// Remembers that `tenant`'s feed stops at `position`; `true` the first
    /// time, so the error is logged once, not on every poll.
    fn note_stop(&self, tenant: TenantId, position: u64) -> bool {
        let mut stops = self
            .stops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stops.insert(tenant, position) != Some(position)
    }

    fn clear_stop(&self, tenant: TenantId) {
        let mut stops = self
            .stops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stops.remove(&tenant).is_some() {
            info!(%tenant, "this tenant's provisioning feed reads again");
        }
    }

    /// Runs until `shutdown` completes, then drains in-flight work until the
    /// deadline and releases what is left.
    ///
    /// In-flight provisionings keep being polled while the runner talks to
    /// its queue: a provisioning may hold a pooled database connection that
    /// the queue call is waiting for.
    ///
    /// # Errors
    /// Only when the queue itself fails while shutting down; failures while
    /// running (including an unreachable vCenter) are logged and retried.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunnerReport, ServiceError> {
        let mut report = RunnerReport::default();
        let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
        let mut finished: VecDeque<JobResult> = VecDeque::new();
        let mut handles: HashMap<VmRequestId, AbortHandle> = HashMap::new();
        let mut held: Vec<Job> = Vec::new();
        let mut parks = Parks::default();
        // Probes say here when their vCenter answered, long before their
        // provisioning ends.
        let (reachable_tx, mut reachable_rx) = futures::channel::mpsc::unbounded::<String>();
        let mut shutdown = pin!(shutdown.fuse());
        // Timers are re-armed only when they fire: completions in between
        // must not postpone them. Feeding and claiming run every poll
        // interval; leases are renewed a few times per lease, which is far
        // less often on a database-backed queue.
        let mut tick = pin!(self.timer.sleep(Duration::ZERO).fuse());
        let mut renew_tick = pin!(self.timer.sleep(self.renew_interval()).fuse());
        let mut purge_tick = pin!(self.timer.sleep(Duration::ZERO).fuse());
        let mut depth_tick = pin!(self.timer.sleep(Duration::ZERO).fuse());
        // Feeding and claiming count their failures apart: one working
        // must not hide that the other keeps failing.
        let mut feed_failures = StoreFailures::default();
        let mut claim_failures = StoreFailures::default();
        let mut fatal: Option<ServiceError> = None;
        let worker = self.config.worker_id.clone();
        info!(worker = %worker, concurrency = self.config.concurrency, "provisioning runner started");
        self.update_health(|h| {
            *h = RunnerHealth {
                running: true,
                ..RunnerHealth::default()
            }
        });
        loop {
            futures::select_biased! {
                _ = shutdown.as_mut() => {
                    info!(in_flight = inflight.len(), held = held.len(), "shutdown requested: no new claims");
                    break;
                }
                done = next_finished(&mut inflight).fuse() => finished.extend(done),
                endpoint = reachable_rx.next() => {
                    if let Some(endpoint) = endpoint {
                        parks.reachable(&endpoint, self.service.clock().now());
                    }
                }
                _ = renew_tick.as_mut() => {
                    renew_tick.set(self.timer.sleep(self.renew_interval()).fuse());
                    let renew = self.renew_held(&worker, &mut held);
                    keep_polling(&mut inflight, &mut finished, renew).await;
                }
                _ = purge_tick.as_mut() => {
                    purge_tick.set(self.timer.sleep(self.config.purge_interval).fuse());
                    let purge = self.queue.purge_finished(self.config.retention);
                    match keep_polling(&mut inflight, &mut finished, purge).await {
                        Ok(0) => {}
                        Ok(purged) => {
                            info!(purged, retention = ?self.config.retention, "purged finished jobs");
                            report.purged += purged;
                        }
                        Err(error) => warn!(%error, "purging finished jobs failed; will try again later"),
                    }
                }
                _ = depth_tick.as_mut() => {
                    depth_tick.set(self.timer.sleep(self.config.queue_depth_interval).fuse());
                    let counts = self.queue.counts();
                    let counts = keep_polling(&mut inflight, &mut finished, counts).await;
                    self.record_queue_depth(counts);
                }
                _ = tick.as_mut() => {
                    tick.set(self.timer.sleep(self.config.poll_interval).fuse());
                    if feed_failures.ready(self.service.clock().now()) {
                        let mut fed = FeedReport::default();
                        let feed = self.feed_into(&mut fed);
                        match keep_polling(&mut inflight, &mut finished, feed).await {
                            Ok(()) => feed_failures.ok(),
                            Err(error) => {
                                self.note_error(&error);
                                metrics::counter!(telemetry::RUNNER_STORE_FAILURES).increment(1);
                                let now = self.service.clock().now();
                                fatal = feed_failures.failed("feeding the work queue", error, now, &self.config);
                            }
                        }
                        report.poison_events += fed.poisoned.len() as u64;
                        report.stopped_feeds = fed.stopped.len() as u64;
                    }
                }
            }
            while let Some((job, kind, result)) = finished.pop_front() {
                handles.remove(&job.request_id);
                let settle = self.settle(&worker, job, kind, result, &mut parks, &mut report);
                keep_polling(&mut inflight, &mut finished, settle).await;
            }
            if fatal.is_some() {
                break;
            }
            // Held jobs go first: their endpoint may be back, or due for
            // another probe.
            let mut still_held = Vec::with_capacity(held.len());
            for job in std::mem::take(&mut held) {
                let endpoint = self.endpoint_of(job.tenant_id);
                let now = self.service.clock().now();
                let dispatch = if parks.is_parked(endpoint.as_deref()) {
                    parks.dispatch(endpoint.as_deref(), job, now, true)
                } else if inflight.len() < self.config.concurrency {
                    Dispatch::Start(job, JobKind::Attempt)
                } else {
                    Dispatch::Hold(job)
                };
                match dispatch {
                    Dispatch::Start(job, kind) => {
                        let (handle, registration) = AbortHandle::new_pair();
                        handles.insert(job.request_id, handle);
                        inflight.push(self.run_job(job, kind, registration, &reachable_tx));
                    }
                    Dispatch::Hold(job) => still_held.push(job),
                }
            }
            held = still_held;
            let free = self.config.concurrency.saturating_sub(inflight.len());
            if free > 0 && claim_failures.ready(self.service.clock().now()) {
                let claim = self.queue.claim(&worker, free, self.config.lease);
                match keep_polling(&mut inflight, &mut finished, claim).await {
                    Ok(jobs) => {
                        claim_failures.ok();
                        for job in jobs {
                            if job.claims > self.config.max_claims {
                                let (handle, registration) = AbortHandle::new_pair();
                                handles.insert(job.request_id, handle);
                                let kind = JobKind::Abandon(job.claims - 1);
                                inflight.push(self.run_job(job, kind, registration, &reachable_tx));
                                continue;
                            }
                            let endpoint = self.endpoint_of(job.tenant_id);
                            let now = self.service.clock().now();
                            let can_hold = held.len() < self.config.concurrency;
                            match parks.dispatch(endpoint.as_deref(), job, now, can_hold) {
                                Dispatch::Start(job, kind) => {
                                    let (handle, registration) = AbortHandle::new_pair();
                                    handles.insert(job.request_id, handle);
                                    inflight.push(self.run_job(
                                        job,
                                        kind,
                                        registration,
                                        &reachable_tx,
                                    ));
                                }
                                Dispatch::Hold(job) => held.push(job),
                            }
                        }
                    }
                    Err(error) => {
                        self.note_error(&error);
                        metrics::counter!(telemetry::RUNNER_STORE_FAILURES).increment(1);
                        let now = self.service.clock().now();
                        fatal =
                            claim_failures.failed("claiming work", error.into(), now, &self.config);
                    }
                }
            }
            let (in_flight, held_here, parked) =
                (inflight.len(), held.len(), parks.by_endpoint.len());
            metrics::gauge!(telemetry::RUNNER_IN_FLIGHT).set(in_flight as f64);
            metrics::gauge!(telemetry::RUNNER_HELD).set(held_here as f64);
            metrics::gauge!(telemetry::RUNNER_PARKED_ENDPOINTS).set(parked as f64);
            let failures = feed_failures.count.max(claim_failures.count);
            self.update_health(|h| {
                h.in_flight = in_flight;
                h.held = held_here;
                h.parked_endpoints = parked;
                h.store_failures = failures;
                h.report = report.clone();
            });
            if fatal.is_some() {
                break;
            }
        }
        for job in held.drain(..) {
            let release = self.queue.release(&worker, job.request_id);
            if let Err(error) = keep_polling(&mut inflight, &mut finished, release).await {
                warn!(request_id = %job.request_id, %error, "could not release a held job; its lease will expire");
            }
            report.released += 1;
        }
        let drained = self
            .drain(
                &worker,
                &mut inflight,
                &mut finished,
                &mut handles,
                &mut parks,
                &mut report,
            )
            .await;
        // The last figures stay on show after the runner stops: read them
        // once more now that the drain has settled its jobs, but a store
        // that does not answer must not hold up the return.
        let counts = pin!(self.queue.counts());
        let limit = pin!(self.timer.sleep(self.config.queue_depth_interval));
        if let futures::future::Either::Left((counts, _)) =
            futures::future::select(counts, limit).await
        {
            self.record_queue_depth(counts);
        }
        info!(?report, "provisioning runner stopped");
        if let Some(error) = fatal.as_ref().or(drained.as_ref().err()) {
            self.note_error(error);
        }
        let last = report.clone();
        self.update_health(|h| {
            h.running = false;
            h.in_flight = 0;
            h.held = 0;
            h.report = last;
        });
        match (fatal, drained) {
            (Some(error), _) | (None, Err(error)) => Err(error),
            (None, Ok(())) => Ok(report),
        }
    }

    /// Publishes the queue's depth per state (gauge and health); a failed
    /// read keeps the last figures, since the next tick reads again.
    fn record_queue_depth(&self, counts: Result<QueueCounts, crate::ports::StoreError>) {
        match counts {
            Ok(counts) => {
                for (state, n) in counts.by_state() {
                    metrics::gauge!(telemetry::QUEUE_JOBS, "state" => state).set(n as f64);
                }
                self.update_health(|h| h.queue = Some(counts));
            }
            Err(error) => debug!(%error, "reading the queue's depth failed; will try again"),
        }
    }

    /// The key of the tenant's vCenter, if the tenant is known.
    fn endpoint_of(&self, tenant: TenantId) -> Option<String> {
        self.service
            .tenants()
            .get(tenant)
            .map(|config| config.vcenter.key())
    }

    /// How often held leases are renewed: a quarter of the lease, so three
    /// renewals in a row may fail before a lease can run out.
    fn renew_interval(&self) -> Duration {
        (self.config.lease / 4).max(Duration::from_millis(1))
    }

    fn run_job(
        &self,
        job: Job,
        kind: JobKind,
        registration: futures::future::AbortRegistration,
        reachable: &futures::channel::mpsc::UnboundedSender<String>,
    ) -> impl Future<Output = JobResult> + Send + '_ {
        let last_attempt = job.attempts + 1 >= self.config.max_attempts;
        let (tenant, request) = (job.tenant_id, job.request_id);
        let run_kind = kind.clone();
        let reachable = reachable.clone();
        let worker = self.config.worker_id.as_str();
        let work = async move {
            if let JobKind::Probe = run_kind {
                if let Some(error) = self.service.check_vcenter(tenant, request).await? {
                    return self
                        .service
                        .wait_for_vcenter_as(tenant, request, &error, worker)
                        .await;
                }
                if let Some(endpoint) = self.endpoint_of(tenant) {
                    // A runner that has stopped listening needs no news.
                    let _ = reachable.unbounded_send(endpoint);
                }
            }
            match run_kind {
                JobKind::Abandon(unfinished) => {
                    error!(request_id = %request, unfinished, "provisioning stopped without finishing every time it was claimed; giving up on the request");
                    let message = format!(
                        "provisioning stopped without finishing {unfinished} times in a row (the process running it crashed or hung each time), so dvmm gave up on this request; ask the platform team to check for a leftover VM before submitting it again"
                    );
                    self.service
                        .abandon_as(tenant, request, &message, worker)
                        .await
                }
                JobKind::Wait(error) => {
                    self.service
                        .wait_for_vcenter_as(tenant, request, &error, worker)
                        .await
                }
                JobKind::Attempt | JobKind::Probe if last_attempt => {
                    self.service.provision_as(tenant, request, worker).await
                }
                JobKind::Attempt | JobKind::Probe => {
                    self.service
                        .provision_attempt_as(tenant, request, worker)
                        .await
                }
            }
        };
        let work = Abortable::new(work, registration);
        // The lease is renewed by the job itself, so it is renewed whenever
        // the job is polled, whatever the runner's loop is awaiting (a feed,
        // a claim, settling another job): in-flight jobs are polled
        // throughout. A lease that is taken over, or that runs out while
        // renewals fail, stops the job where it is.
        let renew = self.keep_lease(request);
        async move {
            let mut work = pin!(work);
            let renew = pin!(renew);
            let result = match futures::future::select(work.as_mut(), renew).await {
                futures::future::Either::Left((result, _)) => result,
                futures::future::Either::Right(((), _)) => Err(Aborted),
            };
            (job, kind, result)
        }
    }

    /// Renews the lease on an in-flight job every renewal interval; returns
    /// only when it is lost (taken over, or lapsed while renewals failed).
    async fn keep_lease(&self, request: VmRequestId) {
        let worker = self.config.worker_id.as_str();
        let lease = self.config.lease;
        let mut valid_until = after(self.service.clock().now(), lease);
        loop {
            self.timer.sleep(self.renew_interval()).await;
            let started = self.service.clock().now();
            match self.queue.renew(worker, request, lease).await {
                Ok(true) => valid_until = after(started, lease),
                Ok(false) => {
                    warn!(request_id = %request, "lease lost; abandoning this attempt");
                    return;
                }
                Err(error) if self.service.clock().now() >= valid_until => {
                    warn!(request_id = %request, %error, "lease ran out while renewals failed; abandoning this attempt");
                    return;
                }
                Err(error) => {
                    warn!(request_id = %request, %error, "lease renewal failed; will retry");
                }
            }
        }
    }

    async fn settle(
        &self,
        worker: &str,
        job: Job,
        kind: JobKind,
        result: Result<Result<ProvisionOutcome, ServiceError>, Aborted>,
        parks: &mut Parks,
        report: &mut RunnerReport,
    ) {
        let id = job.request_id;
        let endpoint = self.endpoint_of(job.tenant_id);
        let now = self.service.clock().now();
        // What the attempt says about its vCenter. A wait job never called
        // it, so it says nothing.
        let mut wait = None;
        if let (JobKind::Attempt | JobKind::Probe, Some(endpoint)) = (&kind, endpoint.as_deref()) {
            match &result {
                Ok(Ok(
                    ProvisionOutcome::Deferred { error, .. }
                    | ProvisionOutcome::Failed { error, .. },
                )) if error.is_unavailable() => {
                    wait = Some(parks.unavailable(endpoint, id, error, now, &self.config.backoff));
                }
                Ok(Ok(ProvisionOutcome::Ready { .. })) => {
                    parks.reachable(endpoint, now);
                    parks.worked(endpoint);
                }
                Ok(Ok(ProvisionOutcome::Failed { .. } | ProvisionOutcome::Deferred { .. })) => {
                    parks.reachable(endpoint, now);
                }
                Ok(Ok(ProvisionOutcome::Skipped { .. }) | Err(_)) | Err(Aborted) => {
                    parks.inconclusive(endpoint, id);
                }
            }
        }
        let queue_result = match result {
            Err(Aborted) | Ok(Err(ServiceError::ClaimLost { .. })) => {
                // Lost the lease: another worker owns the job now.
                report.released += 1;
                metrics::counter!(telemetry::RUNNER_LEASE_LOSSES).increment(1);
                Ok(())
            }
            Ok(Ok(ProvisionOutcome::Ready { .. })) => {
                report.ready += 1;
                self.queue.complete(worker, id).await
            }
            Ok(Ok(ProvisionOutcome::Failed { .. })) => {
                report.failed += 1;
                if let JobKind::Abandon(_) = kind {
                    report.abandoned += 1;
                }
                self.finish_failed(worker, &job).await
            }
            Ok(Ok(ProvisionOutcome::Skipped {
                status: VmRequestStatus::Failed,
                ..
            })) => {
                // Back for a cleanup that failed before (or fed again).
                report.skipped += 1;
                self.finish_failed(worker, &job).await
            }
            Ok(Ok(ProvisionOutcome::Skipped {
                status: VmRequestStatus::Approved | VmRequestStatus::Provisioning,
                reason,
            })) => {
                // Another caller holds the request's claim (a service whose
                // claims are not this queue's); look again later in case it
                // stops. Not the request's fault: no attempt is counted.
                debug!(request_id = %id, %reason, "provisioning by another caller; checking later");
                report.waited += 1;
                metrics::counter!(telemetry::RUNNER_OUTAGE_WAITS).increment(1);
                self.queue
                    .postpone(worker, id, self.config.backoff.delay(job.attempts + 1))
                    .await
            }
            Ok(Ok(ProvisionOutcome::Skipped { .. })) => {
                report.skipped += 1;
                self.queue.complete(worker, id).await
            }
            Ok(Ok(ProvisionOutcome::Deferred { error, .. })) if error.is_unavailable() => {
                // Not the request's fault: no attempt is counted.
                let delay = wait
                    .or_else(|| parks.wait_delay(endpoint.as_deref(), now, &self.config.backoff))
                    .unwrap_or(Duration::ZERO);
                debug!(request_id = %id, %error, ?delay, "waiting for vCenter");
                report.waited += 1;
                metrics::counter!(telemetry::RUNNER_OUTAGE_WAITS).increment(1);
                self.queue.postpone(worker, id, delay).await
            }
            Ok(Ok(ProvisionOutcome::Deferred { error, .. })) => {
                let delay = self.config.backoff.delay(job.attempts + 1);
                info!(request_id = %id, %error, attempt = job.attempts + 1, ?delay, "retryable failure; retrying later");
                report.retried += 1;
                metrics::counter!(telemetry::RUNNER_RETRIES).increment(1);
                self.queue.retry_later(worker, id, delay).await
            }
            Ok(Err(error)) => {
                self.note_error(&error);
                let delay = self.config.backoff.delay(job.attempts + 1);
                warn!(request_id = %id, %error, ?delay, "provisioning command failed; retrying later");
                report.retried += 1;
                metrics::counter!(telemetry::RUNNER_RETRIES).increment(1);
                self.queue.retry_later(worker, id, delay).await
            }
        };
        if let Err(error) = queue_result {
            self.note_error(&error);
            // The lease will expire and the job will be claimed again; the
            // service's idempotency makes that harmless.
            warn!(request_id = %id, %error, "could not update the work queue");
        }
    }

    /// The failure is recorded already; what the attempt left on vCenter is
    /// removed now. A removal that fails keeps the job: it comes back after
    /// a backoff (without counting an attempt while vCenter cannot be
    /// reached), finds the request failed and lands here again.
    async fn finish_failed(&self, worker: &str, job: &Job) -> Result<(), crate::ports::StoreError> {
        let id = job.request_id;
        match self
            .service
            .cleanup_failed_as(job.tenant_id, id, worker)
            .await
        {
            Ok(outcome) => {
                debug!(request_id = %id, ?outcome, "cleanup after the failure");
                self.queue.complete(worker, id).await
            }
            Err(ServiceError::Vsphere(error)) if error.is_unavailable() => {
                let delay = self.config.backoff.delay(job.attempts + 1);
                info!(request_id = %id, %error, ?delay, "cannot remove the failed VM while vCenter is unreachable; later");
                self.queue.postpone(worker, id, delay).await
            }
            Err(error) => {
                let delay = self.config.backoff.delay(job.attempts + 1);
                warn!(request_id = %id, %error, ?delay, "removing the failed VM failed; retrying later");
                self.queue.retry_later(worker, id, delay).await
            }
        }
    }

    /// Renews the leases of held jobs (claimed, not started). In-flight
    /// jobs renew their own (see `run_job`).
    async fn renew_held(&self, worker: &str, held: &mut Vec<Job>) {
        let ids: Vec<VmRequestId> = held.iter().map(|job| job.request_id).collect();
        let results = futures::future::join_all(
            ids.iter()
                .map(|id| self.queue.renew(worker, *id, self.config.lease)),
        )
        .await;
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(true) => {}
                Ok(false) => {
                    warn!(request_id = %id, "lease on a held job lost; another worker has it");
                    held.retain(|job| job.request_id != id);
                }
                Err(error) => debug!(request_id = %id, %error, "lease renewal failed; will retry"),
            }
        }
    }

    async fn drain<F>(
        &self,
        worker: &str,
        inflight: &mut FuturesUnordered<F>,
        finished: &mut VecDeque<JobResult>,
        handles: &mut HashMap<VmRequestId, AbortHandle>,
        parks: &mut Parks,
        report: &mut RunnerReport,
    ) -> Result<(), ServiceError>
    where
        F: Future<Output = JobResult>,
    {
        let mut deadline = pin!(self.timer.sleep(self.config.shutdown_deadline).fuse());
        loop {
            while let Some((job, kind, result)) = finished.pop_front() {
                handles.remove(&job.request_id);
                let settle = self.settle(worker, job, kind, result, parks, report);
                keep_polling(inflight, finished, settle).await;
            }
            if inflight.is_empty() {
                break;
            }
            futures::select_biased! {
                done = next_finished(inflight).fuse() => finished.extend(done),
                _ = deadline.as_mut() => break,
            }
        }
        // Whatever is still running is cancelled (safe: a rerun resumes it)
        // and handed back at once. Results that arrived meanwhile are settled.
        inflight.clear();
        while let Some((job, kind, result)) = finished.pop_front() {
            handles.remove(&job.request_id);
            self.settle(worker, job, kind, result, parks, report).await;
        }
        for (id, handle) in handles.drain() {
            handle.abort();
            self.queue.release(worker, id).await?;
            report.released += 1;
        }
        Ok(())
    }
}

/// The next finished job, or never when nothing runs (an empty
/// `FuturesUnordered` would answer `None` at once and spin the loop).
async fn next_finished<F: Future<Output = JobResult>>(
    inflight: &mut FuturesUnordered<F>,
) -> Option<JobResult> {
    if inflight.is_empty() {
        futures::future::pending().await
    } else {
        inflight.next().await
    }
}

/// Awaits `work` while still driving the in-flight jobs, parking the ones
/// that finish in `finished`. Without this a queue call waiting for a pooled
/// connection could wait forever for a job that holds one and is not polled.
async fn keep_polling<F, W>(
    inflight: &mut FuturesUnordered<F>,
    finished: &mut VecDeque<JobResult>,
    work: W,
) -> W::Output
where
    F: Future<Output = JobResult>,
    W: Future,
{
    let mut work = pin!(work.fuse());
    loop {
        futures::select_biased! {
            output = work => return output,
            done = next_finished(inflight).fuse() => finished.extend(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::FixedJitter;

    fn job(n: u128) -> Job {
        Job {
            tenant_id: TenantId::from_uuid(uuid::Uuid::from_u128(1)),
            request_id: VmRequestId::from_uuid(uuid::Uuid::from_u128(n)),
            attempts: 0,
            claims: 1,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(secs)
    }

    fn refused() -> VsphereError {
        VsphereError::Transport {
            message: "connection refused".into(),
        }
    }

    fn kind(dispatch: &Dispatch) -> &'static str {
        match dispatch {
            Dispatch::Start(_, JobKind::Attempt) => "attempt",
            Dispatch::Start(_, JobKind::Probe) => "probe",
            Dispatch::Start(_, JobKind::Wait(_)) => "wait",
            Dispatch::Start(_, JobKind::Abandon(_)) => "abandon",
            Dispatch::Hold(_) => "hold",
        }
    }

    #[test]
    fn one_probe_per_backoff_step_and_the_rest_waits_or_is_held() {
        let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60))
            .with_jitter(FixedJitter(1.0));
        let mut parks = Parks::default();
        let a = Some("vc-a:443");
        assert_eq!(kind(&parks.dispatch(a, job(1), at(0), true)), "attempt");
        // The attempt meets an outage: parked, next probe in 2 s.
        let wait = parks.unavailable("vc-a:443", job(1).request_id, &refused(), at(0), &backoff);
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(kind(&parks.dispatch(a, job(2), at(1), true)), "wait");
        assert_eq!(
            parks.wait_delay(a, at(1), &backoff),
            Some(Duration::from_secs(1)),
            "until the next probe"
        );
        // Another endpoint is not affected.
        assert_eq!(
            kind(&parks.dispatch(Some("vc-b:443"), job(3), at(1), true)),
            "attempt"
        );
        // Due: one job probes, the next ones are held while it runs.
        assert_eq!(kind(&parks.dispatch(a, job(4), at(2), true)), "probe");
        assert_eq!(kind(&parks.dispatch(a, job(5), at(2), true)), "hold");
        assert_eq!(kind(&parks.dispatch(a, job(6), at(2), false)), "wait");
        // The probe fails: the next one is a longer step away.
        let wait = parks.unavailable("vc-a:443", job(4).request_id, &refused(), at(3), &backoff);
        assert_eq!(wait, Duration::from_secs(4));
        // A failure of a job that is not the probe changes nothing.
        let wait = parks.unavailable("vc-a:443", job(9).request_id, &refused(), at(4), &backoff);
        assert_eq!(wait, Duration::from_secs(3));
        // An inconclusive probe lets another job probe at once.
        assert_eq!(kind(&parks.dispatch(a, job(7), at(7), true)), "probe");
        parks.inconclusive("vc-a:443", job(7).request_id);
        assert_eq!(kind(&parks.dispatch(a, job(8), at(7), true)), "probe");
        // It gets through: the endpoint is unparked.
        parks.reachable("vc-a:443", at(8));
        assert!(!parks.is_parked(a));
        assert_eq!(kind(&parks.dispatch(a, job(10), at(8), true)), "attempt");
        assert_eq!(parks.wait_delay(a, at(8), &backoff), None);
    }

    #[test]
    fn a_vcenter_that_fails_again_right_after_answering_keeps_backing_off() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
            .with_jitter(FixedJitter(1.0));
        let mut parks = Parks::default();
        let a = "vc-a:443";
        assert_eq!(
            parks.unavailable(a, job(1).request_id, &refused(), at(0), &backoff),
            Duration::from_secs(1)
        );
        let mut now = 0;
        for step in 2..=4u32 {
            // The probe is answered, the work fails again at once.
            now += 1 << (step - 2);
            parks.reachable(a, at(now));
            let wait = parks.unavailable(
                a,
                job(u128::from(step)).request_id,
                &refused(),
                at(now),
                &backoff,
            );
            assert_eq!(wait, Duration::from_secs(1 << (step - 1)), "step {step}");
        }
        assert_eq!(parks.by_endpoint[a].since, at(0), "one outage all along");
        // Up for longer than the longest delay: the next outage starts over.
        parks.reachable(a, at(now));
        let wait = parks.unavailable(a, job(9).request_id, &refused(), at(now + 61), &backoff);
        assert_eq!(wait, Duration::from_secs(1));
        // So does one right after a provisioning that went through.
        parks.reachable(a, at(now + 62));
        parks.worked(a);
        let wait = parks.unavailable(a, job(10).request_id, &refused(), at(now + 62), &backoff);
        assert_eq!(wait, Duration::from_secs(1));
    }

    #[test]
    fn runner_configs_out_of_range_are_refused_naming_the_field() {
        assert_eq!(RunnerConfig::default().validate(), Ok(()));
        let field = |config: RunnerConfig| config.validate().map_err(|e| e.field);
        let base = RunnerConfig::default;
        assert_eq!(
            field(RunnerConfig {
                lease: Duration::ZERO,
                ..base()
            }),
            Err("lease"),
            "with a lease of 0 every claim is already expired"
        );
        assert_eq!(
            field(RunnerConfig {
                lease: Duration::from_secs(365 * 24 * 3600),
                ..base()
            }),
            Err("lease")
        );
        assert_eq!(
            field(RunnerConfig {
                concurrency: 0,
                ..base()
            }),
            Err("concurrency")
        );
        assert_eq!(
            field(RunnerConfig {
                poll_interval: Duration::ZERO,
                ..base()
            }),
            Err("poll_interval")
        );
        assert_eq!(
            field(RunnerConfig {
                poll_interval: Duration::from_secs(60),
                ..base()
            }),
            Err("poll_interval"),
            "polling less often than a lease lasts"
        );
        assert_eq!(
            field(RunnerConfig {
                max_attempts: 0,
                ..base()
            }),
            Err("max_attempts")
        );
        assert_eq!(
            field(RunnerConfig {
                max_claims: 1,
                ..base()
            }),
            Err("max_claims")
        );
        assert_eq!(
            field(RunnerConfig {
                max_store_failures: 0,
                ..base()
            }),
            Err("max_store_failures")
        );
        assert_eq!(
            field(RunnerConfig {
                retention: Duration::ZERO,
                ..base()
            }),
            Err("retention")
        );
        assert_eq!(
            field(RunnerConfig {
                shutdown_deadline: Duration::MAX,
                ..base()
            }),
            Err("shutdown_deadline")
        );
        assert_eq!(
            field(RunnerConfig {
                worker_id: " ".into(),
                ..base()
            }),
            Err("worker_id")
        );
        assert_eq!(
            field(RunnerConfig {
                queue_depth_interval: Duration::ZERO,
                ..base()
            }),
            Err("queue_depth_interval"),
            "a depth read on every turn of the loop"
        );
        let err = RunnerConfig {
            lease: Duration::ZERO,
            ..base()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid runner configuration: lease:"),
            "{err}"
        );
    }

    #[test]
    fn jobs_of_unknown_tenants_are_never_parked() {
        let mut parks = Parks::default();
        assert_eq!(kind(&parks.dispatch(None, job(1), at(0), true)), "attempt");
        assert!(!parks.is_parked(None));
    }
}
