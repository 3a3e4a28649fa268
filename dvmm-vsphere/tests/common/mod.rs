//! Test harness: a vcsim per test on a free port, specs for its default
//! inventory, and a "guest" that reports tools and an IP once a VM runs.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ids::{TenantId, VmId, VmRequestId};
use dvmm_core::spec::{VmName, VmResources, VmSpec};
use dvmm_vsphere::methods::{self, ConfigSpec};
use dvmm_vsphere::session::Session;
use dvmm_vsphere::types::{MoRef, PowerState, VmProperties};
use dvmm_vsphere::{SoapOptions, SoapVsphere};

/// A running vcsim, killed on drop.
pub struct Vcsim {
    child: Child,
    /// `https://127.0.0.1:PORT/sdk`.
    pub url: String,
}

fn vcsim_bin() -> PathBuf {
    match std::env::var_os("VCSIM_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/vcsim/bin/vcsim"),
    }
}

fn required() -> bool {
    std::env::var("DVMM_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Reports a skipped test: fails it under `DVMM_REQUIRE_SERVICES=1`,
/// otherwise prints why and appends `<test name>: <why>` to the file named
/// by `DVMM_SKIP_LOG`, so a skip shows in the suite's summary instead of
/// passing as `ok`.
pub fn skip(why: &str) {
    if required() {
        panic!("{why}, and DVMM_REQUIRE_SERVICES=1 requires it");
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown test");
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os("DVMM_SKIP_LOG") {
        // A log that cannot be written must not fail the test it reports on.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{test}: {why}"));
    }
}

/// Awaits `future`, failing the test with what it was waiting for if
/// `limit` passes first.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {limit:?} waiting for {what}"),
    }
}

/// How long one call to vcsim may take before the test fails instead of
/// hanging: several times the slowest call seen on a loaded 2-core machine.
pub const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// `DVMM_TEST_LOG=FILTER` (e.g. `dvmm_vsphere=debug`): the client's logs,
/// each SOAP call's start and end included, shown with a failed test's
/// output.
fn init_test_log() {
    let Ok(filter) = std::env::var("DVMM_TEST_LOG") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_span_events(
            tracing_subscriber::fmt::format::FmtSpan::NEW
                | tracing_subscriber::fmt::format::FmtSpan::CLOSE,
        )
        .with_thread_names(true)
        .with_test_writer()
        .try_init();
}

impl Vcsim {
    /// Starts vcsim with extra flags; `None` (test skipped) when the binary
    /// is missing, unless `DVMM_REQUIRE_SERVICES=1`.
    pub fn start(args: &[&str]) -> Option<Vcsim> {
        init_test_log();
        let bin = vcsim_bin();
        if !bin.exists() {
            skip(&format!(
                "vcsim not found at {} (run scripts/build-vcsim.sh or set VCSIM_BIN)",
                bin.display()
            ));
            return None;
        }
        // DVMM_VCSIM_TRACE=FILE: vcsim's SOAP trace (and, on SIGQUIT, its
        // goroutines), in FILE.<test name>, for debugging a test.
        let trace = std::env::var_os("DVMM_VCSIM_TRACE").and_then(|mut path| {
            let test = std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-");
            path.push(format!(".{test}"));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        let mut command = Command::new(&bin);
        command.args(["-l", "127.0.0.1:0"]).args(args);
        match trace {
            Some(file) => command.arg("-trace").stderr(file),
            None => command.stderr(Stdio::null()),
        };
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("GOVC_URL=").nth(1) {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let govc_url = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("vcsim printed no GOVC_URL");
        // https://user:pass@127.0.0.1:PORT/sdk → drop the credentials.
        let (scheme, rest) = govc_url.split_once("://").expect("URL scheme");
        let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        Some(Vcsim {
            child,
            url: format!("{scheme}://{host}"),
        })
    }

    /// Kills the simulator now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// An endpoint with these credentials, TLS verification off.
    pub fn endpoint(&self, user: &str, password: &str) -> VcenterEndpoint {
        VcenterEndpoint {
            url: self.url.clone(),
            username: user.into(),
            password: Secret::new(password),
            insecure: true,
            thumbprint: None,
            allow_plain_http: false,
        }
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options that keep failing tests fast.
pub fn fast_options() -> SoapOptions {
    SoapOptions {
        request_timeout: Duration::from_secs(10),
        task_timeout: Duration::from_secs(30),
        retry_base_delay: Duration::from_millis(20),
        max_retry_delay: Duration::from_millis(100),
        wait_max_seconds: 5,
        ..SoapOptions::default()
    }
}

/// A spec for vcsim's default inventory.
pub fn spec(endpoint: VcenterEndpoint, folder: &str, name: &str, network: &str) -> VmSpec {
    let name = VmName::parse(name).expect("valid VM name");
    VmSpec {
        tenant_id: TenantId::from_uuid(uuid::Uuid::new_v4()),
        request_id: VmRequestId::from_uuid(uuid::Uuid::new_v4()),
        vm_id: VmId::from_uuid(uuid::Uuid::new_v4()),
        hostname: name.clone(),
        name,
        resources: VmResources {
            cpu: 2,
            memory_mib: 4096,
            disk_gib: 40,
        },
        template: "DC0_C0_RP0_VM0".into(),
        network: network.into(),
        folder_path: folder.into(),
        datacenter: "DC0".into(),
        cluster: "DC0_C0".into(),
        resource_pool: None,
        datastore: "LocalDS_0".into(),
        ip_wait_timeout: Duration::from_secs(20),
        task_timeout: Duration::from_secs(60),
        customization_timeout: Duration::from_secs(30),
        endpoint,
    }
}

/// The VM at an inventory path, if any.
pub async fn find(session: &Session, path: &str) -> Option<MoRef> {
    within(
        CALL_DEADLINE,
        "FindByInventoryPath",
        methods::find_by_inventory_path(session, path),
    )
    .await
    .ok()
    .flatten()
}

/// Reads VM properties with the test's own session.
pub async fn read(session: &Session, vm: &MoRef, paths: &[&str]) -> VmProperties {
    let contents = within(
        CALL_DEADLINE,
        "RetrievePropertiesEx",
        methods::retrieve_properties(session, "VirtualMachine", paths, std::slice::from_ref(vm)),
    )
    .await
    .expect("RetrievePropertiesEx");
    VmProperties::from_content(contents.first().expect("the VM"))
}

/// How long the guest player waits for the VM to appear and power on.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(90);

/// Plays the guest: once the VM at `path` is powered on, reports VMware
/// Tools running and `ip` through vcsim's `SET.guest.*` extraConfig keys and
/// posts a customization that succeeds at once. Panics (failing the awaiting
/// test) if the VM does not appear and power on within [`GUEST_DEADLINE`].
pub fn play_guest(
    session: Arc<Session>,
    path: String,
    ip: &'static str,
) -> tokio::task::JoinHandle<MoRef> {
    play_customizing_guest(
        session,
        path,
        Guest {
            ip,
            ..Guest::default()
        },
    )
}

/// How the played guest's customization ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// `CustomizationSucceeded`, with the final address reported first.
    #[default]
    Succeed,
    /// `CustomizationLinuxIdentityFailed` with this reason.
    Fail(&'static str),
    /// Customization starts and never ends.
    Hang,
    /// Customization never starts (no event at all).
    NeverStart,
}

/// A customizing guest, played the way vCenter records one (vcsim posts no
/// customization events itself, but accepts them through `PostEvent`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Guest {
    /// The address at first boot, with the template's identity.
    pub pre_ip: Option<&'static str>,
    /// The address after customization's reboot (none when empty).
    pub ip: &'static str,
    /// `guest.hostName` reported with the final address, if set.
    pub host_name: Option<&'static str>,
    /// How long customization takes after the first boot (at least
    /// [`MIN_CUSTOMIZING`]).
    pub customizing: Duration,
    /// How it ends.
    pub outcome: Outcome,
}

/// Sets `SET.guest.*` keys on the VM (vcsim copies them into `guest`).
pub async fn set_guest(session: &Arc<Session>, vm: &MoRef, keys: &[(&str, &str)]) {
    let change = ConfigSpec {
        extra_config: keys
            .iter()
            .map(|(k, v)| (format!("SET.guest.{k}"), (*v).to_owned()))
            .collect(),
        ..ConfigSpec::default()
    };
    within(
        CALL_DEADLINE,
        "the guest player's reconfigure",
        methods::reconfig_vm(session, vm, &change),
    )
    .await
    .expect("guest reconfigure");
    // vcsim applies the report in that task: read it back (no collector)
    // until it shows, so an event the player posts next is recorded after
    // the report it follows, and a later report cannot land before it.
    let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
    loop {
        let guest = read(session, vm, &["guest"]).await.guest;
        let shows = keys.iter().all(|(key, value)| {
            let now = match *key {
                "toolsRunningStatus" => guest.tools_running_status.as_deref(),
                "ipAddress" => guest.ip_address.as_deref(),
                "hostName" => guest.host_name.as_deref(),
                _ => Some(*value),
            };
            now == Some(*value)
        });
        if shows {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "guest player: {keys:?} not shown after {CALL_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shortest customization played (see [`play_customizing_guest`]).
pub const MIN_CUSTOMIZING: Duration = Duration::from_secs(2);

/// Plays `guest` for the VM at `path` once it is powered on: tools and the
/// first address, `CustomizationStartedEvent`, then after `customizing`
/// the reboot of a success (tools stop, then run again with the final
/// address and hostname) and the outcome event. Each report shows before
/// the next step.
pub fn play_customizing_guest(
    session: Arc<Session>,
    path: String,
    guest: Guest,
) -> tokio::task::JoinHandle<MoRef> {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + GUEST_DEADLINE;
        let vm = loop {
            if let Some(vm) = find(&session, &path).await {
                break vm;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "guest player: no VM at {path} after {GUEST_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            let props = within(
                CALL_DEADLINE,
                "the guest player's power state read",
                read(&session, &vm, &["runtime.powerState"]),
            )
            .await;
            if props.runtime.power_state == Some(PowerState::PoweredOn) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "guest player: {path} not powered on after {GUEST_DEADLINE:?} ({:?})",
                props.runtime.power_state
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        let mut first = vec![("toolsRunningStatus", "guestToolsRunning")];
        if let Some(pre) = guest.pre_ip {
            first.push(("ipAddress", pre));
        }
        set_guest(&session, &vm, &first).await;
        if guest.outcome == Outcome::NeverStart {
            return vm;
        }
        post(&session, &vm, &name, "CustomizationStartedEvent", None).await;
        // A real customization reboots the guest: its new address comes
        // well after the start event. The client tells the address from
        // before customization by when it learns of the start, which can
        // trail the guest's reports by a long poll's tick; a guest faster
        // than that is not one vCenter records.
        tokio::time::sleep(guest.customizing.max(MIN_CUSTOMIZING)).await;
        match guest.outcome {
            Outcome::Succeed => {
                // Customization's reboot: VMware Tools stop, then the guest
                // comes back with its new identity.
                set_guest(
                    &session,
                    &vm,
                    &[("toolsRunningStatus", "guestToolsNotRunning")],
                )
                .await;
                let mut last = vec![("toolsRunningStatus", "guestToolsRunning")];
                if !guest.ip.is_empty() {
                    last.push(("ipAddress", guest.ip));
                }
                if let Some(host) = guest.host_name {
                    last.push(("hostName", host));
                }
                set_guest(&session, &vm, &last).await;
                post(&session, &vm, &name, "CustomizationSucceeded", None).await;
            }
            Outcome::Fail(reason) => {
                post(
                    &session,
                    &vm,
                    &name,
                    "CustomizationLinuxIdentityFailed",
                    Some(reason),
                )
                .await;
            }
            Outcome::Hang | Outcome::NeverStart => {}
        }
        vm
    })
}

/// Posts a customization event about `vm`.
pub async fn post(session: &Session, vm: &MoRef, name: &str, kind: &str, reason: Option<&str>) {
    within(
        CALL_DEADLINE,
        "the guest player's PostEvent",
        methods::post_vm_event(session, vm, name, kind, reason),
    )
    .await
    .expect("PostEvent");
}

/// A second client with its own session (the "test's own" view).
pub fn observer(endpoint: &VcenterEndpoint) -> (SoapVsphere, Arc<Session>) {
    let client = SoapVsphere::new(fast_options());
    let session = client.session_for(endpoint).expect("session");
    (client, session)
}
