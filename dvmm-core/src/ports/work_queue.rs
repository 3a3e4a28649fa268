//! The runner's durable queue of provisioning jobs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::ids::{TenantId, VmRequestId};

use super::StoreError;

/// One approved request to provision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Tenant.
    pub tenant_id: TenantId,
    /// The request.
    pub request_id: VmRequestId,
    /// Attempts that ended in a retry so far.
    pub attempts: u32,
    /// Claims in a row, this one included, since the job was last given
    /// back ([`WorkQueue::retry_later`], [`WorkQueue::postpone`],
    /// [`WorkQueue::release`]): more than one means the holders before
    /// lost their lease without finishing (they died or hung).
    pub claims: u32,
}

/// How many jobs a [`WorkQueue`] holds in each state
/// ([`WorkQueue::counts`]); the states do not overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting to be claimed and due now.
    pub queued: u64,
    /// Waiting to be claimed, but not before a delay: a retry's backoff, or
    /// a job put off while its vCenter is unreachable.
    pub waiting: u64,
    /// Held by a worker whose lease runs.
    pub leased: u64,
    /// Held by a worker whose lease ran out (it died or hung): the next
    /// claim takes it over.
    pub expired: u64,
    /// Finished, kept until purged.
    pub done: u64,
}

impl QueueCounts {
    /// Each state's label value (as the `state` label of the
    /// `dvmm_queue_jobs` gauge) with its count.
    pub fn by_state(&self) -> [(&'static str, u64); 5] {
        [
            ("queued", self.queued),
            ("waiting", self.waiting),
            ("leased", self.leased),
            ("expired", self.expired),
            ("done", self.done),
        ]
    }
}

/// Durable list of provisioning jobs with leases. Every method is
/// idempotent where it can be, and a lease names its worker so a worker can
/// never complete or renew a job another worker has taken over.
pub trait WorkQueue: Send + Sync {
    /// Adds a job unless one for this request exists (queued, leased or done).
    fn enqueue(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Puts a finished job back in the queue with its counters reset (a
    /// failed request was retried: a new attempt to run); adds it when
    /// there is none. A queued or leased job is left as it is.
    fn requeue(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims up to `max` runnable jobs (queued and due, or leased with an
    /// expired lease) for `worker`, leased for `lease`, counting the claim
    /// in [`Job::claims`].
    fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Job>, StoreError>> + Send;

    /// Extends `worker`'s lease; `false` when the worker no longer holds it.
    fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Marks the job done (only if `worker` holds it).
    fn complete(
        &self,
        worker: &str,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the job back with one more attempt counted, runnable after
    /// `delay`. Like every way of giving a job back, resets [`Job::claims`].
    fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the job back without counting an attempt, runnable after
    /// `delay` (only if `worker` holds it): the job waits for something that
    /// is not about the request, such as its vCenter being reachable again.
    fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the job back at once, without counting an attempt (shutdown).
    fn release(
        &self,
        worker: &str,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the jobs that finished at least `older_than` ago; returns
    /// how many. Jobs that are queued or leased are never touched.
    fn purge_finished(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Jobs per state, across all tenants, for an operator's view of the
    /// backlog. One scan of the queue: the runner calls it at a bounded
    /// rate, not per job.
    fn counts(&self) -> impl Future<Output = Result<QueueCounts, StoreError>> + Send;
}

impl<T: WorkQueue + ?Sized> WorkQueue for Arc<T> {
    fn enqueue(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).enqueue(tenant, request_id)
    }

    fn requeue(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).requeue(tenant, request_id)
    }
    fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Job>, StoreError>> + Send {
        (**self).claim(worker, max, lease)
    }
    fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).renew(worker, request_id, lease)
    }
    fn complete(
        &self,
        worker: &str,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(worker, request_id)
    }
    fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).retry_later(worker, request_id, delay)
    }
    fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).postpone(worker, request_id, delay)
    }
    fn release(
        &self,
        worker: &str,
        request_id: VmRequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(worker, request_id)
    }
    fn purge_finished(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        (**self).purge_finished(older_than)
    }
    fn counts(&self) -> impl Future<Output = Result<QueueCounts, StoreError>> + Send {
        (**self).counts()
    }
}
