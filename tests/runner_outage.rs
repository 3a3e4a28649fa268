//! A runner (memory store, the SOAP client) provisions ~30 approvals into a
//! real vcsim that the test kills with SIGKILL a few seconds in and starts
//! again on the same port about ten seconds later. A restarted vcsim has a
//! fresh inventory (VMs made before the kill are gone, the template is
//! back): every request must still end Ready, none Failed, and vcsim must
//! hold no VM name twice.
//!
//! Needs vcsim (`VCSIM_BIN`, default `target/vcsim/bin/vcsim`, built by
//! `scripts/build-vcsim.sh`). Without it the test skips, unless
//! `DVMM_REQUIRE_SERVICES=1`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::config::Secret;
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::soap::{SoapOptions, SoapVsphere};
use dvmm::{
    Backoff, ProvisioningRunner, ProvisioningService, RunnerConfig, TenantConfig, Tenants,
    TokioTimer, VmRequestId, VmRequestStatus,
};

const APPROVALS: usize = 30;
const OUTAGE: Duration = Duration::from_secs(10);

fn skip(test: &str, why: &str) {
    if std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{test}: {why}, but DVMM_REQUIRE_SERVICES=1 requires it");
    }
    eprintln!("skipping {test}: {why}");
    if let Ok(path) = std::env::var("DVMM_SKIP_LOG")
        && let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(log, "{test}: {why}");
    }
}

fn vcsim_bin() -> PathBuf {
    std::env::var_os("VCSIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vcsim/bin/vcsim"))
}

/// vcsim, killed (SIGKILL) when dropped so a failing test leaves nothing
/// running.
struct Vcsim(Child);

impl Vcsim {
    /// Starts vcsim on `port` and waits until it says it serves.
    fn start(bin: &Path, port: u16) -> Self {
        let mut child = Command::new(bin)
            .args(["-l", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("GOVC_URL=") {
                    let _ = tx.send(());
                }
            }
        });
        let vcsim = Vcsim(child);
        rx.recv_timeout(Duration::from_secs(30))
            .expect("vcsim printed its GOVC_URL within 30 s");
        vcsim
    }

    fn kill(mut self) {
        // std's kill is SIGKILL on Unix: no goodbye to the clients.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn tenant(url: &str) -> TenantConfig {
    let mut tenant = tenant_config("outage", 1);
    tenant.vcenter.url = url.to_owned();
    tenant.vcenter.username = "user".into();
    tenant.vcenter.password = Secret::new("pass");
    tenant.vcenter.insecure = true;
    tenant.template = "DC0_H0_VM0".into();
    tenant.validate().expect("valid tenant");
    tenant
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vcsim_killed_and_restarted_under_a_running_runner_loses_no_request() {
    const TEST: &str = "a_vcsim_killed_and_restarted_under_a_running_runner_loses_no_request";
    let bin = vcsim_bin();
    if !bin.exists() {
        skip(
            TEST,
            &format!(
                "vcsim is not built at {} (run scripts/build-vcsim.sh or set VCSIM_BIN)",
                bin.display()
            ),
        );
        return;
    }
    // RUST_LOG=dvmm_core=info shows the runner parking and resuming.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let port = free_port();
    let mut vcsim = Some(Vcsim::start(&bin, port));
    let tenant = tenant(&format!("https://127.0.0.1:{port}/sdk"));
    let vsphere = SoapVsphere::new(SoapOptions::default());
    // vcsim records no guest customization: play guests that customize at
    // once, from a session of their own.
    // Back within a second of vCenter's return, not the default 30 s.
    let player_client = SoapVsphere::new(SoapOptions {
        breaker_cooldown: Duration::from_secs(1),
        ..SoapOptions::default()
    });
    let _player = dvmm_vsphere::guest_player::play_customizations(
        player_client
            .session_for(&tenant.vcenter)
            .expect("player session"),
        "DC0/vm".into(),
    );
    let store = Arc::new(MemoryEventStore::new());
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        vsphere.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    ));
    let mut ids: Vec<VmRequestId> = Vec::with_capacity(APPROVALS);
    for i in 0..APPROVALS {
        let id = service
            .submit(new_request(&tenant, &format!("o{i:03}")))
            .await
            .unwrap();
        service.approve(tenant.tenant_id, id, user()).await.unwrap();
        ids.push(id);
    }
    let runner = ProvisioningRunner::new(
        service.clone(),
        Arc::new(MemoryWorkQueue::new()),
        Arc::new(MemoryCheckpoints::new()),
        TokioTimer,
        RunnerConfig {
            worker_id: "outage".into(),
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(3)),
            ..RunnerConfig::default()
        },
    )
    .expect("a valid runner configuration");
    let statuses = || {
        let service = service.clone();
        let ids = ids.clone();
        let tenant = tenant.tenant_id;
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let request = service.request(tenant, id).await.unwrap();
                out.push(request.expect("request exists").status);
            }
            out
        }
    };
    let count = |statuses: &[VmRequestStatus], wanted: VmRequestStatus| {
        statuses.iter().filter(|s| **s == wanted).count()
    };

    let scenario = async {
        // Kill vcsim once a few VMs are ready, with most of the work ahead.
        let before_kill = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let now = statuses().await;
                if count(&now, VmRequestStatus::Ready) >= 3 {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("three VMs were ready within two minutes of starting");
        if let Some(vcsim) = vcsim.take() {
            vcsim.kill();
        }
        let ready_at_kill = count(&before_kill, VmRequestStatus::Ready);
        assert!(
            ready_at_kill < APPROVALS / 2,
            "the kill came too late to test anything: {ready_at_kill} already ready"
        );
        tokio::time::sleep(OUTAGE).await;
        let during = statuses().await;
        assert_eq!(
            count(&during, VmRequestStatus::Failed),
            0,
            "no request failed while vcsim was down: {during:?}"
        );
        vcsim = Some(Vcsim::start(&bin, port));
        let settled = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let now = statuses().await;
                if now.iter().all(|s| {
                    !matches!(s, VmRequestStatus::Approved | VmRequestStatus::Provisioning)
                }) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if settled.is_err() {
            let now = statuses().await;
            panic!(
                "not every request settled within two minutes of the restart: \
                 {} ready, {} provisioning, {} failed (RUST_LOG=dvmm_core::runner=info \
                 shows whether the runner parked and probed the vCenter)",
                count(&now, VmRequestStatus::Ready),
                count(&now, VmRequestStatus::Provisioning),
                count(&now, VmRequestStatus::Failed)
            );
        }
    };
    let report = tokio::time::timeout(Duration::from_secs(600), runner.run(scenario))
        .await
        .expect("the run ended within ten minutes")
        .expect("the runner stopped cleanly");
    eprintln!("{report:?}");

    let end = statuses().await;
    assert_eq!(
        count(&end, VmRequestStatus::Ready),
        APPROVALS,
        "every request ends Ready: {end:?}"
    );
    assert_eq!(report.failed, 0, "{report:?}");
    let names = tokio::time::timeout(
        Duration::from_secs(60),
        vsphere.list_vm_names(&tenant.vcenter, &tenant.datacenter, "outage/web"),
    )
    .await
    .expect("listing the VMs answered within a minute")
    .expect("the restarted vcsim lists the VMs");
    let mut per_name: HashMap<&str, usize> = HashMap::new();
    for name in &names {
        *per_name.entry(name).or_default() += 1;
    }
    let twice: Vec<_> = per_name.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "duplicate VM names in vcsim: {twice:?}");
    assert!(
        !names.is_empty() && names.len() <= APPROVALS,
        "{} VMs after the restart",
        names.len()
    );
    vsphere.shutdown().await;
    drop(vcsim);
}
