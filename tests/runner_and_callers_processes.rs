//! Runner processes and direct `provision` callers (the `runner` example
//! with `--direct`, real OS processes) race on the same requests through one
//! PostgreSQL database and one vcsim: every process shares the request
//! claims through the work queue. One direct caller is killed with SIGKILL
//! while it holds claims; they lapse within the lease and the runners resume
//! those requests. The run ends with every request `Ready`, its VM recorded
//! provisioned (no failure on either stream), and exactly one VM per request
//! in vcsim.
//!
//! Needs `DATABASE_URL` (an admin/owner URL; the test creates and drops its
//! own database) and vcsim (`VCSIM_BIN`, default `target/vcsim/bin/vcsim`).
//! Without them the test skips, saying why (also in `DVMM_SKIP_LOG`), unless
//! `DVMM_REQUIRE_SERVICES=1`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use dvmm::store::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use dvmm::store::postgres::sqlx::{self, PgPool};
use uuid::Uuid;

const APPROVALS: usize = 120;
const LEASE_SECS: u64 = 3;
const TEST: &str = "runners_and_direct_callers_share_requests_and_agree";

fn required() -> bool {
    std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1")
}

fn skip(why: &str) {
    if required() {
        panic!("{why}, but DVMM_REQUIRE_SERVICES=1 requires it");
    }
    eprintln!("skipping: {why}");
    if let Ok(path) = std::env::var("DVMM_SKIP_LOG")
        && let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(log, "{TEST}: {why}");
    }
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn vcsim_bin() -> PathBuf {
    std::env::var_os("VCSIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/vcsim/bin/vcsim"))
}

/// A process killed when dropped, so a failing test leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts vcsim on a free port; returns it with its SDK URL.
fn start_vcsim(bin: &Path) -> (Proc, String) {
    let mut child = Command::new(bin)
        .args(["-l", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("GOVC_URL=").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let proc = Proc(child);
    let govc_url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("vcsim printed its GOVC_URL");
    // https://user:pass@127.0.0.1:PORT/sdk → without the credentials.
    let (scheme, rest) = govc_url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    (proc, format!("{scheme}://{host}"))
}

/// The runner example, built with the features of this test run.
fn runner_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(workspace()).args([
        "build",
        "--quiet",
        "--example",
        "runner",
        "--all-features",
    ]);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building the runner example failed");
    let bin = profile_dir.join("examples/runner");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

struct TestDb {
    name: String,
    url: String,
    admin: PgPool,
    server: PgConnectOptions,
}

async fn create_database(url: &str) -> TestDb {
    let server = PgConnectOptions::from_str(url).expect("DATABASE_URL is a URL");
    let maintenance = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone())
        .await
        .expect("connect to DATABASE_URL");
    let name = format!("dvmm_t_{}", &Uuid::new_v4().simple().to_string()[..12]);
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&maintenance)
        .await
        .expect("create the test database");
    maintenance.close().await;
    // Same server and credentials, other database.
    let mut parsed = url.split('?');
    let base = parsed.next().unwrap_or(url);
    let query = parsed.next();
    let (prefix, _) = base
        .rsplit_once('/')
        .expect("a database path in DATABASE_URL");
    let db_url = match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    };
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(server.clone().database(&name))
        .await
        .expect("connect to the test database");
    TestDb {
        name,
        url: db_url,
        admin,
        server,
    }
}

impl TestDb {
    async fn drop(self) {
        self.admin.close().await;
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.server.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&maintenance)
        .await
        .expect("drop the test database");
        // The example's login for this database (see examples/runner.rs).
        sqlx::query(&format!("DROP ROLE IF EXISTS dvmm_runner_{}", self.name))
            .execute(&maintenance)
            .await
            .expect("drop the example's role");
    }

    async fn leased_by(&self, worker: &str) -> HashSet<Uuid> {
        sqlx::query_scalar(
            "SELECT request_id FROM dvmm_jobs WHERE state = 'leased' AND worker = $1",
        )
        .bind(worker)
        .fetch_all(&self.admin)
        .await
        .map(|ids: Vec<Uuid>| ids.into_iter().collect())
        .unwrap_or_default()
    }

    async fn done(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dvmm_jobs WHERE state = 'done'")
            .fetch_one(&self.admin)
            .await
            .unwrap_or(0)
    }
}

fn spawn_runner(
    bin: &Path,
    db_url: &str,
    vcsim_url: &str,
    tenant: &str,
    worker: &str,
    approve: usize,
    direct: bool,
) -> Proc {
    let child = Command::new(bin)
        .args(["--database-url", db_url])
        .args(["--vcenter-url", vcsim_url])
        .args(["--username", "user", "--password", "pass", "--insecure"])
        .args(["--template", "DC0_H0_VM0", "--ip-timeout-secs", "1"])
        .args(["--tenant", tenant, "--worker-id", worker])
        .args(["--workers", if direct { "0" } else { "1" }])
        .args(["--concurrency", "8"])
        .args(if direct { &["--direct"][..] } else { &[][..] })
        .args(["--lease-secs", &LEASE_SECS.to_string()])
        .args(["--approve", &approve.to_string()])
        .args(["--expect", &APPROVALS.to_string()])
        .args(["--max-secs", "300", "--no-progress"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the runner example");
    Proc(child)
}

/// Waits for a runner to exit and returns the fields of its `summary:` line
/// and of its `direct:` line, if any.
fn summary(mut proc: Proc, name: &str) -> (HashMap<String, String>, HashMap<String, String>) {
    let deadline = Instant::now() + Duration::from_secs(330);
    let status = loop {
        if let Some(status) = proc.0.try_wait().expect("wait for the runner") {
            break status;
        }
        assert!(Instant::now() < deadline, "runner {name} did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(proc.0.stdout.as_mut().expect("stdout"), &mut out).unwrap();
    let line = out
        .lines()
        .rfind(|l| l.starts_with("summary: "))
        .unwrap_or_else(|| panic!("runner {name} ({status}) printed no summary:\n{out}"));
    assert!(
        status.success(),
        "runner {name} exited with {status}: {line}"
    );
    let fields = |line: &str| -> HashMap<String, String> {
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let direct = out
        .lines()
        .rfind(|l| l.starts_with("direct: "))
        .map(fields)
        .unwrap_or_default();
    (fields(line), direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_and_direct_callers_share_requests_and_agree() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        return skip("DATABASE_URL is not set (eval \"$(scripts/pg-throwaway.sh start)\")");
    };
    let vcsim = vcsim_bin();
    if !vcsim.exists() {
        return skip(&format!(
            "vcsim not found at {} (run scripts/build-vcsim.sh or set VCSIM_BIN)",
            vcsim.display()
        ));
    }
    let started = Instant::now();
    let bin = runner_binary();
    let db = create_database(&url).await;
    let (_vcsim, vcsim_url) = start_vcsim(&vcsim);
    let tenant = format!("t{}", &Uuid::new_v4().simple().to_string()[..8]);

    let approver = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "a", APPROVALS, false);
    let runner = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "b", 0, false);
    let victim = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "d", 0, true);
    let caller = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "e", 0, true);

    // Kill direct caller "d" mid-run, while it holds claims on requests.
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        assert!(
            Instant::now() < deadline,
            "direct caller d never held a claim while the run went on"
        );
        let held = db.leased_by("d-direct").await;
        if !held.is_empty() && db.done().await >= (APPROVALS / 10) as i64 {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut victim = victim;
    victim.0.kill().expect("SIGKILL the direct caller");
    let killed_at = Instant::now();
    victim.0.wait().expect("reap the direct caller");
    eprintln!("killed direct caller d holding {} claim(s)", held.len());
    // Its claims lapse and are taken over (or finished by whoever resumes).
    loop {
        let still_held = db.leased_by("d-direct").await;
        if still_held.is_empty() {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(LEASE_SECS + 10),
            "{} claim(s) of the killed caller were never taken over",
            still_held.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let expected = HashMap::from([
        ("ready".to_owned(), APPROVALS.to_string()),
        ("failed".to_owned(), "0".to_owned()),
        ("vms".to_owned(), APPROVALS.to_string()),
        ("duplicates".to_owned(), "0".to_owned()),
    ]);
    for (name, proc) in [("a", approver), ("b", runner), ("e", caller)] {
        let (fields, direct) = summary(proc, name);
        for (key, value) in &expected {
            assert_eq!(fields.get(key), Some(value), "process {name}: {key}");
        }
        if name == "e" {
            eprintln!("direct caller e: {direct:?}");
            assert_eq!(direct.get("failed").map(String::as_str), Some("0"));
            assert_eq!(direct.get("errors").map(String::as_str), Some("0"));
            let calls: u64 = ["ready", "skipped", "deferred"]
                .iter()
                .map(|k| {
                    direct
                        .get(*k)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                })
                .sum();
            assert!(calls > 0, "the direct caller made no calls: {direct:?}");
        }
    }

    // The store, read directly: every request Ready once, every VM
    // provisioned once, no failure recorded anywhere.
    let ready: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*) FROM dvmm_events \
         WHERE stream_type = 'VmRequest' AND event_type = 'VmRequestReady' GROUP BY stream_id",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(ready.len(), APPROVALS);
    assert!(
        ready.iter().all(|(_, n)| *n == 1),
        "a request became Ready twice"
    );
    let provisioned: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*) FROM dvmm_events \
         WHERE stream_type = 'Vm' AND event_type = 'VmProvisioned' GROUP BY stream_id",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        provisioned.len(),
        APPROVALS,
        "VM streams recorded provisioned"
    );
    assert!(provisioned.iter().all(|(_, n)| *n == 1));
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dvmm_events \
         WHERE event_type IN ('VmProvisioningFailed', 'VmRequestProvisioningFailed')",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(failures, 0, "failures recorded while the VMs were made");
    let vm_streams: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT stream_id) FROM dvmm_events WHERE stream_type = 'Vm'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(vm_streams, APPROVALS as i64);
    let open_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM dvmm_jobs WHERE state <> 'done'")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(open_jobs, 0, "every claim was given back as finished");

    // vcsim, asked by govc (independent of our SOAP client) when available.
    let govc = vcsim.with_file_name("govc");
    if govc.exists() {
        let out = Command::new(&govc)
            .args(["find", "-type", "m", &format!("/DC0/vm/{tenant}")])
            .env("GOVC_URL", vcsim_url.replacen("://", "://user:pass@", 1))
            .env("GOVC_INSECURE", "1")
            .output()
            .expect("run govc");
        assert!(
            out.status.success(),
            "govc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let unique: HashSet<&String> = paths.iter().collect();
        assert_eq!(paths.len(), APPROVALS, "VMs in vcsim");
        assert_eq!(unique.len(), APPROVALS, "duplicate VM paths in vcsim");
    }
    db.drop().await;
    eprintln!("took {:?}", started.elapsed());
}
