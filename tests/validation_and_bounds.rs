//! Validation and bounds: tenant configurations are checked when they are
//! registered, and no timeout, whatever a configuration built in code says,
//! can overflow the deadline arithmetic of a provisioning.
//!
//! The vcsim test needs vcsim (`VCSIM_BIN`, default
//! `target/vcsim/bin/vcsim`, built by `scripts/build-vcsim.sh`). Without it
//! it skips, unless `DVMM_REQUIRE_SERVICES=1`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tenant_config;
use dvmm::core::config::{MAX_IP_WAIT_SECS, MAX_TASK_SECS, Secret};
use dvmm::core::spec::{PowerState, VmName, VmResources};
use dvmm::vsphere::soap::{SoapOptions, SoapVsphere};
use dvmm::{Tenants, VmId, VmRequestId, VmSpec, VspherePort};
use uuid::Uuid;

#[test]
fn tenants_refuse_a_configuration_that_fails_validation() {
    let mut huge = tenant_config("acme", 5);
    huge.timeouts.ip_wait_secs = u64::MAX;
    let err = Tenants::new()
        .with(huge.clone())
        .expect_err("an IP wait of u64::MAX seconds is refused");
    assert_eq!(err.field, "timeouts.ip_wait_secs");

    let mut tenants = Tenants::new();
    let mut bad_url = tenant_config("beta", 5);
    bad_url.vcenter.url = "http://vc.test.invalid/sdk".into();
    let err = tenants.insert(bad_url.clone()).expect_err("plain http");
    assert_eq!(err.field, "vcenter.url");
    assert!(tenants.get(bad_url.tenant_id).is_none(), "nothing added");

    let good = tenant_config("gamma", 5);
    tenants.insert(good.clone()).expect("valid");
    assert!(tenants.get(good.tenant_id).is_some());
}

#[test]
fn timeouts_built_in_code_are_capped_where_they_become_durations() {
    let mut config = tenant_config("acme", 5);
    config.timeouts.ip_wait_secs = u64::MAX;
    config.timeouts.task_secs = u64::MAX;
    config.timeouts.unavailable_deadline_secs = u64::MAX;
    assert_eq!(
        config.timeouts.ip_wait(),
        Duration::from_secs(MAX_IP_WAIT_SECS)
    );
    assert_eq!(config.timeouts.task(), Duration::from_secs(MAX_TASK_SECS));
    assert_eq!(
        config.timeouts.unavailable_deadline(),
        Duration::from_secs(7 * 24 * 3600)
    );
}

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

/// vcsim, killed when dropped so a failing test leaves nothing running.
struct Vcsim(Child);

impl Vcsim {
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

/// A tenant built in code with timeouts no validation would let through
/// provisions on vcsim without a panic: the clone, the power-on and the
/// start of the IP wait all compute deadlines from them. vcsim's guests
/// report no IP, so the IP wait (capped at an hour) is cut short once the
/// VM is on and that wait has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_timeouts_built_in_code_provision_on_vcsim_without_overflow() {
    const TEST: &str = "huge_timeouts_built_in_code_provision_on_vcsim_without_overflow";
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
    let port = free_port();
    let _vcsim = Vcsim::start(&bin, port);
    let mut tenant = tenant_config("huge", 5);
    tenant.vcenter.url = format!("https://127.0.0.1:{port}/sdk");
    tenant.vcenter.username = "user".into();
    tenant.vcenter.password = Secret::new("pass");
    tenant.vcenter.insecure = true;
    tenant.template = "DC0_H0_VM0".into();
    tenant.timeouts.ip_wait_secs = u64::MAX;
    tenant.timeouts.task_secs = u64::MAX;
    let name = VmName::new("web", "huge01").expect("valid name");
    let spec = VmSpec::for_request(
        &tenant,
        VmRequestId::from_uuid(Uuid::new_v4()),
        VmId::from_uuid(Uuid::new_v4()),
        &name,
        "web",
        VmResources {
            cpu: 1,
            memory_mib: 1024,
            disk_gib: 10,
        },
    );
    assert_eq!(spec.ip_wait_timeout, Duration::from_secs(MAX_IP_WAIT_SECS));
    assert_eq!(spec.task_timeout, Duration::from_secs(MAX_TASK_SECS));

    let vsphere = SoapVsphere::new(SoapOptions::default());
    provision_until_the_ip_wait(&vsphere, &spec).await;

    // A spec built by hand is not capped by the configuration: the client
    // must cope with any duration too.
    let by_hand = VmSpec {
        name: VmName::new("web", "huge02").expect("valid name"),
        hostname: VmName::new("web", "huge02").expect("valid name"),
        vm_id: VmId::from_uuid(Uuid::new_v4()),
        ip_wait_timeout: Duration::MAX,
        task_timeout: Duration::MAX,
        ..spec
    };
    provision_until_the_ip_wait(&vsphere, &by_hand).await;
}

/// Runs `create_vm` until it is done, or until the VM has been on for a
/// while (the IP wait has begun and would last its whole timeout on vcsim).
async fn provision_until_the_ip_wait(vsphere: &SoapVsphere, spec: &VmSpec) {
    let create = vsphere.create_vm(spec);
    let powered_on = async {
        loop {
            if let Ok(Some(info)) = vsphere.find_vm(spec).await
                && info.power_state == PowerState::PoweredOn
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The IP wait starts right after the power-on: give the provisioning
        // time to get into it.
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::select! {
            result = create => Some(result),
            () = powered_on => None,
        }
    })
    .await
    .expect("the VM was cloned and powered on within 120 s");
    if let Some(result) = outcome {
        let result = result.expect("provisioned");
        assert_eq!(result.hostname, spec.hostname.as_str());
    }
    let found = vsphere
        .find_vm(spec)
        .await
        .expect("vcsim answers")
        .expect("the VM exists");
    assert_eq!(found.dvmm_vm_id, Some(spec.vm_id));
    assert_eq!(found.power_state, PowerState::PoweredOn);
}
