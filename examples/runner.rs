//! Files and approves N requests and lets background runner workers turn
//! them into VMs, in this process or shared with other processes.
//!
//! ```text
//! # memory store + in-process simulator, 3 workers, 5% injected faults
//! cargo run --example runner -- --workers 3 --approve 200 --fault-rate 0.05
//!
//! # PostgreSQL (an owner/admin URL: the example migrates and connects as an
//! # application login) + one vCenter (or vcsim) shared by every process:
//! cargo run --features postgres --example runner -- --database-url postgres://... \
//!     --vcenter-url https://127.0.0.1:8989/sdk --username user --password pass \
//!     --insecure --template DC0_H0_VM0 --ip-timeout-secs 1 --customization-timeout-secs 0 \
//!     --tenant demo --approve 300
//! # ...and in other terminals, workers that only join:
//! cargo run --features postgres --example runner -- --database-url postgres://... \
//!     <same vCenter flags> --tenant demo --approve 0 --expect 300
//! ```
//!
//! Every process ends when the tenant has at least `--expect` requests (by
//! default `--approve`) and none of them is still waiting or provisioning,
//! and prints one line:
//! `summary: ready=R failed=F vms=V duplicates=D elapsed_ms=T`
//! (R and F counted from the event store, V = VMs in the tenant's project
//! folder in vSphere, D = VM names found there more than once). Use a fresh
//! `--tenant` per run on a shared database, since the counts cover all of the
//! tenant's requests.
//!
//! A vCenter outage does not stop the workers: requests wait for it (see the
//! "Waiting for vCenter" timeline entries) and resume when it is back. If
//! vSphere still cannot be read when the run ends, V and D are printed as 0,
//! a `not counted:` line before the summary says so, and the exit status is
//! 1: ready and failed always come from the store.

use dvmm::Backoff;
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use clap::Parser;
use common::{VcenterArgs, tenant_id_for};
use dvmm::VmId;
use dvmm::config::VcenterEndpoint;
use dvmm::ports::{PowerOffMode, PowerOffOutcome, ProgressReporter};
use dvmm::runner::{CheckpointStore, WorkQueue};
use dvmm::spec::VmGuestInfo;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{Delays, Simulator, SimulatorConfig};
use dvmm::vsphere::soap::{SoapOptions, SoapVsphere};
use dvmm::{
    EventStore, NewVmRequest, ProjectId, ProvisioningRunner, ProvisioningService, RunnerConfig,
    TenantConfig, TenantId, Tenants, TimelineSink, TokioTimer, UserId, VmProvisioningResult,
    VmSize, VmSpec, VmwareVmId, VsphereError, VspherePort,
};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

/// Background provisioning of many approved requests, on one process or many.
/// What the vSphere audit and the logout at the end get even when
/// `--max-secs` has already passed.
const AUDIT_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// PostgreSQL URL of a role that may migrate (feature `postgres`). Without
    /// it the memory store is used (one process only).
    #[arg(long)]
    database_url: Option<String>,
    /// Runner workers in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests to file and approve (0: only work on what others approve).
    #[arg(long, default_value_t = 100)]
    approve: usize,
    /// Requests to wait for before stopping (default: --approve, at least 1).
    #[arg(long)]
    expect: Option<usize>,
    /// Share of VM creations that fail with a transient error: half before
    /// the call, half after the VM was created (the answer is lost).
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Provisionings in flight per worker.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Lease of a claimed job, renewed while it runs.
    #[arg(long, default_value_t = 30)]
    lease_secs: u64,
    /// This process's worker id prefix (default: `pid<process id>`).
    #[arg(long)]
    worker_id: Option<String>,
    /// Give up after this long. The process then ends within 20 s more, even
    /// against a vCenter that never answers: 10 s for in-flight work to
    /// finish, 5 s to count the VMs, 5 s to log out.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Tenant short name (its folder in vCenter).
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// Project prefix (first part of every VM name, and its folder).
    #[arg(long, default_value = "run")]
    project: String,
    /// Size of every VM: S, M, L or XL.
    #[arg(long, default_value = "S")]
    size: String,
    /// How long to wait for each guest IP (default: 120 s on a vCenter,
    /// 2 s on the simulator).
    #[arg(long)]
    ip_timeout_secs: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Also call `provision` directly, as a host would, on every request
    /// that is approved or provisioning, racing the runners (which may be 0
    /// here); prints a `direct:` line with what those calls returned.
    #[arg(long)]
    direct: bool,
    /// Serve the metrics in Prometheus text format on this address (e.g.
    /// 127.0.0.1:9464, path /metrics).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// With --metrics-addr: keep serving this long after the summary line,
    /// so a scraper can read the final figures.
    #[arg(long, default_value_t = 0)]
    metrics_linger_secs: u64,
    /// Where to provision: a vCenter, or the in-process simulator.
    #[command(flatten)]
    vcenter: VcenterArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    let linger = Duration::from_secs(args.metrics_linger_secs);
    if let Some(addr) = args.metrics_addr {
        // The library only records through the `metrics` facade; the
        // exporter is the host's choice, here Prometheus over HTTP.
        if let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
        {
            eprintln!("error: cannot serve metrics on {addr}: {e}");
            return ExitCode::from(2);
        }
        println!("metrics: http://{addr}/metrics");
    }
    let outcome = run(args).await;
    let lingering = async {
        if !linger.is_zero() {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::time::sleep(linger).await;
        }
    };
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            lingering.await;
            if summary.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// What a run ends with.
struct Summary {
    ready: usize,
    failed: usize,
    vms: usize,
    duplicates: usize,
    elapsed: Duration,
    finished: bool,
}

impl Summary {
    fn is_clean(&self) -> bool {
        self.finished && self.failed == 0 && self.duplicates == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "summary: ready={} failed={} vms={} duplicates={} elapsed_ms={}",
            self.ready,
            self.failed,
            self.vms,
            self.duplicates,
            self.elapsed.as_millis()
        )
    }
}

async fn run(args: Args) -> Result<Summary, String> {
    let started = Instant::now();
    let size: VmSize = args.size.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return Err(format!(
            "--fault-rate must be between 0 and 1, not {}",
            args.fault_rate
        ));
    }
    if (args.workers == 0 && !args.direct) || args.concurrency == 0 {
        return Err("--workers (unless --direct) and --concurrency must be at least 1".into());
    }
    dvmm::VmName::new(&args.project, "vm00000-0000").map_err(|e| e.to_string())?;
    let run = Run {
        size,
        started,
        expect: args.expect.unwrap_or(args.approve).max(1),
        tag: Uuid::new_v4().simple().to_string()[..4].to_owned(),
        args,
    };
    match run.args.vcenter.vcenter_url.clone() {
        Some(url) => {
            let tenant = run.vcenter_tenant(url)?;
            let vsphere = SoapVsphere::new(SoapOptions::default());
            let audit = Audit::Soap {
                client: vsphere.clone(),
                endpoint: tenant.vcenter.clone(),
                datacenter: tenant.datacenter.clone(),
                folder: format!("{}/{}", tenant.slug, run.args.project),
            };
            let summary = run.with_store(&tenant, vsphere.clone(), audit).await;
            // Logging out is a courtesy: a vCenter that does not answer must
            // not hold the process past --max-secs.
            if tokio::time::timeout(AUDIT_GRACE, vsphere.shutdown())
                .await
                .is_err()
            {
                eprintln!("logging out of vCenter took too long; leaving the session to expire");
            }
            summary
        }
        None => {
            if run.args.database_url.is_some() {
                eprintln!(
                    "note: the simulator lives in this process; to share VMs between processes, \
                     point every process at one vCenter or vcsim with --vcenter-url"
                );
            }
            let simulator = Simulator::new(SimulatorConfig {
                delays: Delays {
                    clone: Duration::from_millis(150),
                    power_on: Duration::from_millis(30),
                    ip_report: Duration::from_millis(100),
                    ..Delays::default()
                },
                ..SimulatorConfig::default()
            });
            let mut tenant = simulator
                .tenant_config(tenant_id_for(&run.args.tenant), &run.args.tenant)
                .map_err(|e| e.to_string())?;
            tenant.timeouts.ip_wait_secs = run.args.ip_timeout_secs.unwrap_or(2);
            let audit = Audit::Simulator {
                simulator: simulator.clone(),
                folder: format!("{}/{}", tenant.slug, run.args.project),
            };
            run.with_store(&tenant, simulator, audit).await
        }
    }
}

struct Run {
    args: Args,
    size: VmSize,
    started: Instant,
    expect: usize,
    /// Keeps this run's VM names apart from earlier runs of the same tenant.
    tag: String,
}

impl Run {
    fn vcenter_tenant(&self, url: String) -> Result<TenantConfig, String> {
        self.args.vcenter.tenant(
            url,
            &self.args.tenant,
            self.args.ip_timeout_secs.unwrap_or(120),
        )
    }

    /// Picks the store: PostgreSQL with `--database-url`, else memory.
    async fn with_store<V: VspherePort + 'static>(
        &self,
        tenant: &TenantConfig,
        vsphere: V,
        audit: Audit,
    ) -> Result<Summary, String> {
        let vsphere = Flaky {
            inner: vsphere,
            rate: self.args.fault_rate,
        };
        let tenants = Tenants::new()
            .with(tenant.clone())
            .map_err(|e| e.to_string())?;
        // Direct calls and the runners share one claim per request: the
        // queue's lease.
        let lease = Duration::from_secs(self.args.lease_secs.max(1));
        let Some(url) = &self.args.database_url else {
            let queue = Arc::new(MemoryWorkQueue::new());
            let service = ProvisioningService::new(
                Arc::new(MemoryEventStore::new()),
                vsphere,
                Arc::new(MemoryTimeline::new()),
                tenants,
            )
            .with_claims(queue.clone(), TokioTimer, lease)
            .with_holder_name(format!("{}-direct", self.worker_prefix()));
            let checkpoints = Arc::new(MemoryCheckpoints::new());
            return self
                .drive(tenant, Arc::new(service), queue, checkpoints, audit)
                .await;
        };
        #[cfg(feature = "postgres")]
        {
            let pool_size = u32::try_from(self.args.workers * self.args.concurrency)
                .unwrap_or(u32::MAX)
                .clamp(5, 40);
            let parts = postgres::connect(url, pool_size).await?;
            let queue = parts.work_queue;
            let checkpoints = parts.checkpoints;
            let service = ProvisioningService::new(parts.store, vsphere, parts.timeline, tenants)
                .with_claims(queue.clone(), TokioTimer, lease)
                .with_holder_name(format!("{}-direct", self.worker_prefix()));
            self.drive(tenant, Arc::new(service), queue, checkpoints, audit)
                .await
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = (url, vsphere, tenants, audit, lease);
            Err("--database-url needs the postgres feature: cargo run --features postgres --example runner -- --database-url URL".into())
        }
    }

    /// Files the approvals, runs the workers until every expected request is
    /// settled, then stops them gracefully and counts.
    async fn drive<S, V, T, Q, K>(
        &self,
        tenant: &TenantConfig,
        service: Arc<ProvisioningService<S, V, T>>,
        queue: Q,
        checkpoints: K,
        audit: Audit,
    ) -> Result<Summary, String>
    where
        S: EventStore + 'static,
        V: VspherePort + 'static,
        T: TimelineSink + 'static,
        Q: WorkQueue + Clone + 'static,
        K: CheckpointStore + Clone + 'static,
    {
        let args = &self.args;
        let prefix = self.worker_prefix();
        let runners: Vec<_> = (0..args.workers)
            .map(|i| {
                ProvisioningRunner::new(
                    service.clone(),
                    queue.clone(),
                    checkpoints.clone(),
                    TokioTimer,
                    RunnerConfig {
                        worker_id: format!("{prefix}-w{i}"),
                        concurrency: args.concurrency,
                        lease: Duration::from_secs(args.lease_secs.max(1)),
                        poll_interval: Duration::from_millis(200),
                        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
                        shutdown_deadline: Duration::from_secs(10),
                        ..RunnerConfig::default()
                    },
                )
                .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        let (stop, _) = tokio::sync::watch::channel(false);
        let workers = futures::future::join_all(runners.iter().map(|runner| {
            let mut stopped = stop.subscribe();
            runner.run(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
        }));

        let progress = if args.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(self.expect as u64)
        };
        progress.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} settled  {msg}")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );

        let filing = self.file_approvals(&service, tenant);
        let watching = async {
            let mut tracker = Tracker::default();
            let deadline = self.started + Duration::from_secs(args.max_secs);
            let finished = loop {
                match tracker.update(service.store(), tenant.tenant_id).await {
                    Ok(()) => {
                        let c = tracker.counts();
                        progress.set_length(self.expect.max(c.total) as u64);
                        progress.set_position(c.settled() as u64);
                        progress.set_message(format!(
                            "ready {} failed {} in progress {}",
                            c.ready, c.failed, c.pending
                        ));
                        if c.total >= self.expect && c.pending == 0 {
                            break true;
                        }
                    }
                    Err(e) => progress.println(format!("reading the store failed: {e}")),
                }
                if Instant::now() >= deadline {
                    progress.println(format!("giving up after {} s", args.max_secs));
                    break false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tokio::signal::ctrl_c() => {
                        progress.println("interrupted: stopping the workers");
                        break false;
                    }
                }
            };
            let _ = stop.send(true);
            (finished, tracker)
        };
        let direct = self.provision_directly(&service, tenant, stop.subscribe());
        let (filed, reports, (finished, tracker), direct) =
            tokio::join!(filing, workers, watching, direct);
        if let Some(direct) = direct {
            println!("{direct}");
        }
        progress.finish_and_clear();
        filed?;
        for report in reports {
            let report = report.map_err(|e| e.to_string())?;
            eprintln!(
                "worker: ready {} failed {} skipped {} retried {} released {} waited for vCenter {}",
                report.ready,
                report.failed,
                report.skipped,
                report.retried,
                report.released,
                report.waited
            );
        }
        let counts = tracker.counts();
        // The store has the answer for ready and failed; vSphere is only
        // asked for the audit, and an unreachable vCenter must not turn a
        // finished run into an error without those counts.
        let (vms, duplicates, audited) = match self.count_vms(&audit).await {
            Ok(names) => {
                let mut per_name: HashMap<&str, usize> = HashMap::new();
                for name in &names {
                    *per_name.entry(name).or_default() += 1;
                }
                let duplicates = per_name.values().filter(|n| **n > 1).count();
                (names.len(), duplicates, true)
            }
            Err(error) => {
                println!(
                    "not counted: vms and duplicates (vSphere could not be read: {error}); \
                     ready and failed are from the store"
                );
                (0, 0, false)
            }
        };
        Ok(Summary {
            ready: counts.ready,
            failed: counts.failed,
            vms,
            duplicates,
            elapsed: self.started.elapsed(),
            finished: finished && audited,
        })
    }

    /// The VM names in vSphere, asking a few times over about half a minute
    /// (but not past `--max-secs`) when vCenter cannot be reached. Each ask
    /// gets the time left (at least [`AUDIT_GRACE`]), so a vCenter that
    /// answers slowly or trickles cannot keep the example past `--max-secs`.
    async fn count_vms(&self, audit: &Audit) -> Result<Vec<String>, VsphereError> {
        let deadline = self.started + Duration::from_secs(self.args.max_secs);
        let mut attempt = 0;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(AUDIT_GRACE);
            let asked = tokio::time::timeout(left, audit.vm_names())
                .await
                .unwrap_or_else(|_| {
                    Err(VsphereError::Timeout {
                        operation: format!("the VM list (gave up after {} s)", left.as_secs()),
                    })
                });
            match asked {
                Ok(names) => return Ok(names),
                Err(error)
                    if error.is_unavailable() && attempt < 5 && Instant::now() < deadline =>
                {
                    attempt += 1;
                    eprintln!("counting VMs in vSphere failed ({error}); trying again");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// This process's worker id prefix.
    fn worker_prefix(&self) -> String {
        self.args
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("pid{}", std::process::id()))
    }

    /// With `--direct`: calls `provision` on every request that is approved
    /// or provisioning until told to stop, and says what the calls returned.
    async fn provision_directly<S, V, T>(
        &self,
        service: &ProvisioningService<S, V, T>,
        tenant: &TenantConfig,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<String>
    where
        S: EventStore,
        V: VspherePort,
        T: TimelineSink,
    {
        use dvmm::{ProvisionOutcome, VmRequestStatus};
        if !self.args.direct {
            return None;
        }
        let (mut ready, mut failed, mut skipped, mut deferred, mut errors) = (0, 0, 0, 0, 0);
        while !*stop.borrow() {
            let requests = service
                .list_requests(tenant.tenant_id)
                .await
                .unwrap_or_default();
            let open: Vec<_> = requests
                .iter()
                .filter(|r| {
                    matches!(
                        r.status,
                        VmRequestStatus::Approved | VmRequestStatus::Provisioning
                    )
                })
                .map(|r| r.id)
                .collect();
            let outcomes: Vec<_> = futures::stream::iter(open)
                .map(|id| service.provision(tenant.tenant_id, id))
                .buffer_unordered(self.args.concurrency)
                .collect()
                .await;
            for outcome in outcomes {
                match outcome {
                    Ok(ProvisionOutcome::Ready { .. }) => ready += 1,
                    Ok(ProvisionOutcome::Failed { .. }) => failed += 1,
                    Ok(ProvisionOutcome::Skipped { .. }) => skipped += 1,
                    Ok(ProvisionOutcome::Deferred { .. }) => deferred += 1,
                    Err(_) => errors += 1,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
        }
        Some(format!(
            "direct: ready={ready} failed={failed} skipped={skipped} deferred={deferred} errors={errors}"
        ))
    }

    async fn file_approvals<S, V, T>(
        &self,
        service: &ProvisioningService<S, V, T>,
        tenant: &TenantConfig,
    ) -> Result<(), String>
    where
        S: EventStore,
        V: VspherePort,
        T: TimelineSink,
    {
        let project_id = ProjectId::from_uuid(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            self.args.project.as_bytes(),
        ));
        let approver = UserId::new_v4();
        let requester = UserId::new_v4();
        let results: Vec<Result<(), String>> = futures::stream::iter(0..self.args.approve)
            .map(|i| async move {
                let id = service
                    .submit(NewVmRequest {
                        tenant_id: tenant.tenant_id,
                        project_id,
                        project_prefix: self.args.project.clone(),
                        requested_name: format!("vm{i:05}-{}", self.tag),
                        size: self.size,
                        requested_by: requester,
                        justification: "filed by the runner example".into(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                service
                    .approve(tenant.tenant_id, id, approver)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// Where the VMs are counted after the run.
enum Audit {
    Simulator {
        simulator: Simulator,
        folder: String,
    },
    Soap {
        client: SoapVsphere,
        endpoint: VcenterEndpoint,
        datacenter: String,
        folder: String,
    },
}

impl Audit {
    async fn vm_names(&self) -> Result<Vec<String>, VsphereError> {
        match self {
            Audit::Simulator { simulator, folder } => Ok(simulator
                .vms()
                .into_iter()
                .filter(|vm| &vm.folder_path == folder)
                .map(|vm| vm.name)
                .collect()),
            Audit::Soap {
                client,
                endpoint,
                datacenter,
                folder,
            } => client.list_vm_names(endpoint, datacenter, folder).await,
        }
    }
}

/// Follows the tenant's events and keeps each request's last state.
#[derive(Default)]
struct Tracker {
    after: u64,
    requests: HashMap<String, Settled>,
}

#[derive(Clone, Copy, PartialEq)]
enum Settled {
    No,
    Ready,
    Failed,
    Closed,
}

#[derive(Default)]
struct Counts {
    total: usize,
    ready: usize,
    failed: usize,
    pending: usize,
}

impl Counts {
    fn settled(&self) -> usize {
        self.total - self.pending
    }
}

impl Tracker {
    async fn update<S: EventStore>(&mut self, store: &S, tenant: TenantId) -> Result<(), String> {
        loop {
            let page = store
                .read_all(tenant, self.after, 1000)
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            self.after = last.position;
            for event in page.iter().filter(|e| {
                e.stream_id.stream_type == <dvmm::VmRequest as dvmm::Aggregate>::STREAM_TYPE
            }) {
                let state = match event.event_type.as_str() {
                    "VmRequestReady" => Settled::Ready,
                    "VmRequestProvisioningFailed" => Settled::Failed,
                    "VmRequestRejected" | "VmRequestCancelled" => Settled::Closed,
                    _ => Settled::No,
                };
                let slot = self
                    .requests
                    .entry(event.stream_id.id.clone())
                    .or_insert(Settled::No);
                if state != Settled::No {
                    *slot = state;
                }
            }
        }
    }

    fn counts(&self) -> Counts {
        let mut c = Counts {
            total: self.requests.len(),
            ..Counts::default()
        };
        for state in self.requests.values() {
            match state {
                Settled::Ready => c.ready += 1,
                Settled::Failed => c.failed += 1,
                Settled::Closed => {}
                Settled::No => c.pending += 1,
            }
        }
        c
    }
}

/// Injects transient failures into VM creation.
struct Flaky<V> {
    inner: V,
    rate: f64,
}

impl<V> Flaky<V> {
    /// `None`, or whether the fault hits before (`false`) or after (`true`)
    /// the real call.
    fn roll(&self) -> Option<bool> {
        let draw = (Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
        (draw < self.rate).then_some(draw < self.rate / 2.0)
    }
}

impl<V: VspherePort> VspherePort for Flaky<V> {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        self.create_vm_reporting(spec, &|_| {}).await
    }

    // Passes the inner client's progress on ("Customizing guest").
    async fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        match self.roll() {
            None => self.inner.create_vm_reporting(spec, progress).await,
            Some(false) => Err(VsphereError::Transport {
                message: "injected fault: connection reset before the call".into(),
            }),
            Some(true) => {
                self.inner.create_vm_reporting(spec, progress).await?;
                Err(VsphereError::Transport {
                    message: "injected fault: the answer was lost after the VM was created".into(),
                })
            }
        }
    }

    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        self.inner.get_vm(endpoint, id).await
    }

    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        self.inner.find_vm(spec).await
    }

    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        self.inner.power_off_vm(endpoint, id, owner, mode).await
    }

    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        self.inner.destroy_vm(endpoint, id, owner).await
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::Duration;

    use dvmm::config::Secret;
    use dvmm::store::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use dvmm::store::postgres::{PgParts, SetupOptions, setup_with};

    /// The application login of a database: `dvmm_runner_{database}` (roles
    /// are cluster-wide, so deployments on other databases keep their own).
    pub fn app_login(database: &str) -> String {
        let mut role: String = format!("dvmm_runner_{database}")
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .collect();
        role.truncate(63);
        role
    }

    /// Sets the database up with the given (owner) URL and connects as an
    /// application login that row-level security applies to.
    pub async fn connect(url: &str, pool_size: u32) -> Result<PgParts, String> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|_| "--database-url is not a postgres:// URL".to_owned())?;
        let login = app_login(options.get_database().unwrap_or("postgres"));
        // Every process of a run derives the same password, so processes that
        // start together cannot lock each other out by resetting it. It is a
        // one-way function of the admin URL, which the caller already holds.
        let password = Secret::new(format!(
            "runner-{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, url.as_bytes()).simple()
        ));
        let setup = SetupOptions {
            pool: PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(30)),
            ..SetupOptions::default()
        };
        setup_with(options, &login, &password, setup)
            .await
            .map_err(|e| e.to_string())
    }
}
