//! One concrete type per port, chosen at run time: a host that picks memory
//! or PostgreSQL, and the simulator or a vCenter, from its configuration
//! keeps [`HostService`] (and [`HostRunner`]) in its state instead of naming
//! five (or eight) type parameters and making every helper generic.
//!
//! Each `Any…` type is an enum over the shipped adapters and implements the
//! port by delegating to the one it holds: one `match` per call, no boxing,
//! no dynamic dispatch. The generic path (`ProvisioningService<S, V, T>`
//! with your own adapters) stays as it is.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dvmm::any::{AnyVsphere, Backend, HostService};
//! use dvmm::Tenants;
//!
//! // e.g. from the host's config file: "memory" or a PostgreSQL setup.
//! let backend = Backend::Memory;
//! let (stores, vsphere) = (backend.open().await?, AnyVsphere::simulator());
//! let service: HostService = stores.service(vsphere, Tenants::new());
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use dvmm_core::event::{NewEvent, StoredEvent, StreamId};
use dvmm_core::ids::{TenantId, VmRequestId};
use dvmm_core::ports::{
    AppendOutcome, BoxFuture, CheckpointStore, ClaimAttempt, EventStore, Job, QueueCounts,
    RequestClaims, StoreError, TimelineSink, WorkQueue,
};
use dvmm_core::timeline::TimelineEntry;
#[cfg(feature = "vsphere")]
use dvmm_core::{ProvisioningService, Tenants};
use dvmm_store_memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};

/// Delegates one port call to the adapter an `Any…` enum holds.
macro_rules! delegate {
    ($self:expr, $adapter:ident => $call:expr) => {
        match $self {
            Self::Memory($adapter) => $call,
            #[cfg(feature = "postgres")]
            Self::Postgres($adapter) => $call,
        }
    };
}

/// An [`EventStore`]: in memory or on PostgreSQL.
#[derive(Clone, Debug)]
pub enum AnyEventStore {
    /// [`MemoryEventStore`].
    Memory(Arc<MemoryEventStore>),
    /// `PgEventStore` (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(dvmm_store_postgres::PgEventStore),
}

impl EventStore for AnyEventStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        delegate!(self, s => s.append(tenant, stream, expected_version, events).await)
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        delegate!(self, s => s.load(tenant, stream).await)
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        delegate!(self, s => s.read_all(tenant, after, limit).await)
    }
}

/// A [`TimelineSink`]: in memory or on PostgreSQL.
#[derive(Clone, Debug)]
pub enum AnyTimeline {
    /// [`MemoryTimeline`].
    Memory(Arc<MemoryTimeline>),
    /// `PgTimeline` (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(dvmm_store_postgres::PgTimeline),
}

impl TimelineSink for AnyTimeline {
    async fn record(&self, entry: TimelineEntry) -> Result<(), StoreError> {
        delegate!(self, t => t.record(entry).await)
    }

    async fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        delegate!(self, t => t.list(tenant, request_id).await)
    }
}

/// The runner's [`WorkQueue`], which is also the service's shared
/// [`RequestClaims`]: in memory (one process) or on PostgreSQL.
#[derive(Clone, Debug)]
pub enum AnyWorkQueue {
    /// [`MemoryWorkQueue`].
    Memory(Arc<MemoryWorkQueue>),
    /// `PgWorkQueue` (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(dvmm_store_postgres::PgWorkQueue),
}

impl WorkQueue for AnyWorkQueue {
    async fn enqueue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        delegate!(self, q => q.enqueue(tenant, request_id).await)
    }

    async fn requeue(&self, tenant: TenantId, request_id: VmRequestId) -> Result<(), StoreError> {
        delegate!(self, q => q.requeue(tenant, request_id).await)
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        delegate!(self, q => q.claim(worker, max, lease).await)
    }

    async fn renew(
        &self,
        worker: &str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        delegate!(self, q => q.renew(worker, request_id, lease).await)
    }

    async fn complete(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        delegate!(self, q => q.complete(worker, request_id).await)
    }

    async fn retry_later(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        delegate!(self, q => q.retry_later(worker, request_id, delay).await)
    }

    async fn postpone(
        &self,
        worker: &str,
        request_id: VmRequestId,
        delay: Duration,
    ) -> Result<(), StoreError> {
        delegate!(self, q => q.postpone(worker, request_id, delay).await)
    }

    async fn release(&self, worker: &str, request_id: VmRequestId) -> Result<(), StoreError> {
        delegate!(self, q => q.release(worker, request_id).await)
    }

    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        delegate!(self, q => q.purge_finished(older_than).await)
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        delegate!(self, q => q.counts().await)
    }
}

impl RequestClaims for AnyWorkQueue {
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>> {
        delegate!(self, q => q.acquire(tenant, request_id, holder, lease))
    }

    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        delegate!(self, q => q.renew_claim(holder, request_id, lease))
    }

    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        delegate!(self, q => q.release_claim(holder, request_id, finished))
    }
}

/// The runner's [`CheckpointStore`]: in memory or on PostgreSQL.
#[derive(Clone, Debug)]
pub enum AnyCheckpoints {
    /// [`MemoryCheckpoints`].
    Memory(Arc<MemoryCheckpoints>),
    /// `PgCheckpoints` (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(dvmm_store_postgres::PgCheckpoints),
}

impl CheckpointStore for AnyCheckpoints {
    async fn load(&self, name: &str, tenant: TenantId) -> Result<u64, StoreError> {
        delegate!(self, c => c.load(name, tenant).await)
    }

    async fn save(&self, name: &str, tenant: TenantId, position: u64) -> Result<(), StoreError> {
        delegate!(self, c => c.save(name, tenant, position).await)
    }
}

/// The vSphere side: the in-process simulator or a real vCenter over SOAP
/// (feature `vsphere`).
#[cfg(feature = "vsphere")]
#[derive(Clone, Debug)]
pub enum AnyVsphere {
    /// The simulator.
    Simulator(dvmm_vsphere::sim::Simulator),
    /// The SOAP client.
    Soap(dvmm_vsphere::SoapVsphere),
}

#[cfg(feature = "vsphere")]
impl AnyVsphere {
    /// A simulator with its default inventory and delays.
    pub fn simulator() -> Self {
        Self::Simulator(dvmm_vsphere::sim::Simulator::default())
    }

    /// The SOAP client with these options (nothing is connected yet).
    pub fn soap(options: dvmm_vsphere::SoapOptions) -> Self {
        Self::Soap(dvmm_vsphere::SoapVsphere::new(options))
    }
}

/// Delegates one vSphere call to the client an [`AnyVsphere`] holds.
#[cfg(feature = "vsphere")]
macro_rules! delegate_vsphere {
    ($self:expr, $client:ident => $call:expr) => {
        match $self {
            Self::Simulator($client) => $call,
            Self::Soap($client) => $call,
        }
    };
}

#[cfg(feature = "vsphere")]
impl dvmm_core::ports::VspherePort for AnyVsphere {
    async fn create_vm(
        &self,
        spec: &dvmm_core::spec::VmSpec,
    ) -> Result<dvmm_core::spec::VmProvisioningResult, dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.create_vm(spec).await)
    }

    async fn create_vm_reporting(
        &self,
        spec: &dvmm_core::spec::VmSpec,
        progress: dvmm_core::ports::ProgressReporter<'_>,
    ) -> Result<dvmm_core::spec::VmProvisioningResult, dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.create_vm_reporting(spec, progress).await)
    }

    async fn get_vm(
        &self,
        endpoint: &dvmm_core::config::VcenterEndpoint,
        id: &dvmm_core::ids::VmwareVmId,
    ) -> Result<dvmm_core::VmGuestInfo, dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.get_vm(endpoint, id).await)
    }

    async fn find_vm(
        &self,
        spec: &dvmm_core::spec::VmSpec,
    ) -> Result<Option<dvmm_core::VmGuestInfo>, dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.find_vm(spec).await)
    }

    async fn power_off_vm(
        &self,
        endpoint: &dvmm_core::config::VcenterEndpoint,
        id: &dvmm_core::ids::VmwareVmId,
        owner: dvmm_core::ids::VmId,
        mode: dvmm_core::ports::PowerOffMode,
    ) -> Result<dvmm_core::ports::PowerOffOutcome, dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.power_off_vm(endpoint, id, owner, mode).await)
    }

    async fn destroy_vm(
        &self,
        endpoint: &dvmm_core::config::VcenterEndpoint,
        id: &dvmm_core::ids::VmwareVmId,
        owner: dvmm_core::ids::VmId,
    ) -> Result<(), dvmm_core::ports::VsphereError> {
        delegate_vsphere!(self, v => v.destroy_vm(endpoint, id, owner).await)
    }
}

/// The service a host holds whatever it chose at run time.
#[cfg(feature = "vsphere")]
pub type HostService = ProvisioningService<AnyEventStore, AnyVsphere, AnyTimeline>;

/// The runner over a [`HostService`].
#[cfg(feature = "vsphere")]
pub type HostRunner = dvmm_core::runner::ProvisioningRunner<
    AnyEventStore,
    AnyVsphere,
    AnyTimeline,
    dvmm_core::clock::SystemClock,
    dvmm_core::clock::RandomIds,
    AnyWorkQueue,
    AnyCheckpoints,
    crate::TokioTimer,
>;

/// Where a host keeps its data, as its configuration says.
#[derive(Clone, Debug)]
pub enum Backend {
    /// In memory: lost when the process ends; one process only.
    Memory,
    /// PostgreSQL, set up with [`dvmm_store_postgres::setup`] (feature
    /// `postgres`).
    #[cfg(feature = "postgres")]
    Postgres {
        /// An owner or superuser URL, used to migrate and to ensure the
        /// login; not kept.
        admin_url: String,
        /// The login the application runs as.
        login: String,
        /// Its password.
        password: dvmm_core::config::Secret,
    },
}

/// The four persistence adapters of one [`Backend`], sharing one store.
#[derive(Clone, Debug)]
pub struct Stores {
    /// The event store.
    pub events: AnyEventStore,
    /// The timeline.
    pub timeline: AnyTimeline,
    /// The work queue (and shared claims).
    pub work_queue: AnyWorkQueue,
    /// The checkpoints.
    pub checkpoints: AnyCheckpoints,
    /// The request read model.
    pub requests: AnyRequests,
}

/// The request read model: in memory or on PostgreSQL.
#[derive(Clone, Debug)]
pub enum AnyRequests {
    /// `MemoryRequests`.
    Memory(Arc<dvmm_store_memory::MemoryRequests>),
    /// `PgRequests` (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(dvmm_store_postgres::PgRequests),
}

impl dvmm_core::read_model::RequestReadModel for AnyRequests {
    fn upsert<'a>(
        &'a self,
        row: dvmm_core::read_model::RequestSummary,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        delegate!(self, r => r.upsert(row))
    }

    fn list<'a>(
        &'a self,
        tenant: TenantId,
        filter: &'a dvmm_core::read_model::RequestFilter,
        after: Option<dvmm_core::read_model::Cursor>,
        limit: usize,
    ) -> BoxFuture<
        'a,
        Result<dvmm_core::read_model::Page<dvmm_core::read_model::RequestSummary>, StoreError>,
    > {
        delegate!(self, r => r.list(tenant, filter, after, limit))
    }
}

/// Why [`Backend::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Setting up PostgreSQL failed (see its error for what: unreachable,
    /// authentication, migration, role).
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] dvmm_store_postgres::Error),
}

impl Backend {
    /// Opens the backend: nothing to do in memory; PostgreSQL is set up in
    /// one call (probe, migrate, login, pool).
    ///
    /// # Errors
    /// [`OpenError`] from the PostgreSQL setup.
    pub async fn open(&self) -> Result<Stores, OpenError> {
        match self {
            Backend::Memory => Ok(Stores {
                events: AnyEventStore::Memory(Arc::new(MemoryEventStore::new())),
                timeline: AnyTimeline::Memory(Arc::new(MemoryTimeline::new())),
                work_queue: AnyWorkQueue::Memory(Arc::new(MemoryWorkQueue::new())),
                checkpoints: AnyCheckpoints::Memory(Arc::new(MemoryCheckpoints::new())),
                requests: AnyRequests::Memory(Arc::new(dvmm_store_memory::MemoryRequests::new())),
            }),
            #[cfg(feature = "postgres")]
            Backend::Postgres {
                admin_url,
                login,
                password,
            } => {
                let parts = dvmm_store_postgres::setup(admin_url, login, password).await?;
                Ok(Stores {
                    events: AnyEventStore::Postgres(parts.store),
                    timeline: AnyTimeline::Postgres(parts.timeline),
                    work_queue: AnyWorkQueue::Postgres(parts.work_queue),
                    checkpoints: AnyCheckpoints::Postgres(parts.checkpoints),
                    requests: AnyRequests::Postgres(parts.requests),
                })
            }
        }
    }
}

#[cfg(feature = "vsphere")]
impl Stores {
    /// A [`HostService`] on these stores, with their request read model,
    /// whose provisioning claims are the work queue's (so direct `provision` calls and the runner exclude
    /// each other, across processes on PostgreSQL), with a 30 s lease.
    pub fn service(&self, vsphere: AnyVsphere, tenants: Tenants) -> HostService {
        ProvisioningService::new(self.events.clone(), vsphere, self.timeline.clone(), tenants)
            .with_claims(
                self.work_queue.clone(),
                crate::TokioTimer,
                Duration::from_secs(30),
            )
            .with_read_model(self.requests.clone())
    }

    /// A [`HostRunner`] for `service`, on these stores' queue and
    /// checkpoints.
    ///
    /// # Errors
    /// As [`dvmm_core::runner::ProvisioningRunner::new`].
    pub fn runner(
        &self,
        service: Arc<HostService>,
        config: dvmm_core::runner::RunnerConfig,
    ) -> Result<HostRunner, dvmm_core::runner::RunnerConfigError> {
        dvmm_core::runner::ProvisioningRunner::new(
            service,
            self.work_queue.clone(),
            self.checkpoints.clone(),
            crate::TokioTimer,
            config,
        )
    }
}
