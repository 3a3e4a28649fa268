//! Three runner processes (the `runner` example, real OS processes) share
//! 300 approvals through one PostgreSQL database and provision into one
//! vcsim. One of them is killed with SIGKILL while it holds leases: its
//! claims must be taken over within the lease time, every request must end
//! `Ready`, and vcsim must hold exactly one VM per request.
//!
//! Needs `DATABASE_URL` (an admin/owner URL; the test creates and drops its
//! own database) and vcsim (`VCSIM_BIN`, default `target/vcsim/bin/vcsim`,
//! built by `scripts/build-vcsim.sh`), and govc next to vcsim for the
//! independent count of VMs. Without them the test skips (and says so in
//! `DVMM_SKIP_LOG`), unless `DVMM_REQUIRE_SERVICES=1`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use dvmm::store::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use dvmm::store::postgres::sqlx::{self, PgPool};
use uuid::Uuid;

const APPROVALS: usize = 300;
const LEASE_SECS: u64 = 3;

fn required() -> bool {
    std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// Fails under `DVMM_REQUIRE_SERVICES=1`; otherwise prints why and appends
/// `<test name>: <why>` to the file named by `DVMM_SKIP_LOG`, so the skip
/// shows in the suite's summary instead of passing as `ok`.
fn skip(why: &str) {
    if required() {
        panic!("{why}, but DVMM_REQUIRE_SERVICES=1 requires it");
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

/// How long one statement against the test database may take.
const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test with what it was waiting for if
/// `limit` passes first.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {limit:?} waiting for {what}"),
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
    // Usually a no-op (the test run built it); a cold build on a busy
    // 2-core machine takes a few minutes.
    let limit = Duration::from_secs(900);
    let mut child = Proc(build.spawn().expect("run cargo build"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for cargo build") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "building the runner example took over {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
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
    let maintenance = within(
        QUERY_DEADLINE,
        "a connection to DATABASE_URL",
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(server.clone()),
    )
    .await
    .expect("connect to DATABASE_URL");
    let name = format!("dvmm_t_{}", &Uuid::new_v4().simple().to_string()[..12]);
    within(
        QUERY_DEADLINE,
        "CREATE DATABASE",
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&maintenance),
    )
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
    let admin = within(
        QUERY_DEADLINE,
        "a connection to the test database",
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(server.clone().database(&name)),
    )
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
        let maintenance = within(
            QUERY_DEADLINE,
            "a connection to DATABASE_URL",
            PgPoolOptions::new()
                .max_connections(1)
                .connect_with(self.server.clone()),
        )
        .await
        .expect("connect to DATABASE_URL");
        within(
            QUERY_DEADLINE,
            "DROP DATABASE",
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&maintenance),
        )
        .await
        .expect("drop the test database");
        // The example's login for this database (see examples/runner.rs).
        within(
            QUERY_DEADLINE,
            "DROP ROLE",
            sqlx::query(&format!("DROP ROLE IF EXISTS dvmm_runner_{}", self.name))
                .execute(&maintenance),
        )
        .await
        .expect("drop the example's role");
    }

    /// Jobs `worker` holds a lease on. A database error fails the test: an
    /// empty answer would read as a takeover.
    async fn leased_by(&self, worker: &str) -> HashSet<Uuid> {
        let ids: Vec<Uuid> = within(
            QUERY_DEADLINE,
            "the leases of a worker",
            sqlx::query_scalar(
                "SELECT request_id FROM dvmm_jobs WHERE state = 'leased' AND worker = $1",
            )
            .bind(worker)
            .fetch_all(&self.admin),
        )
        .await
        .unwrap_or_else(|e| panic!("reading the leases of {worker}: {e}"));
        ids.into_iter().collect()
    }

    /// Jobs done so far. Before the runners have created `dvmm_jobs`
    /// (undefined table, SQLSTATE 42P01) that is 0; any other error fails
    /// the test.
    async fn done(&self) -> i64 {
        let result = within(
            QUERY_DEADLINE,
            "the count of done jobs",
            sqlx::query_scalar("SELECT count(*) FROM dvmm_jobs WHERE state = 'done'")
                .fetch_one(&self.admin),
        )
        .await;
        match result {
            Ok(n) => n,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => 0,
            Err(e) => panic!("counting done jobs: {e}"),
        }
    }
}

/// Runs `command` to completion, failing the test if it takes over `limit`.
fn output_within(mut command: Command, limit: Duration, what: &str) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.output());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("gave up after {limit:?} waiting for {what}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn spawn_runner(
    bin: &Path,
    db_url: &str,
    vcsim_url: &str,
    tenant: &str,
    worker: &str,
    approve: usize,
) -> Proc {
    let child = Command::new(bin)
        .args(["--database-url", db_url])
        .args(["--vcenter-url", vcsim_url])
        .args(["--username", "user", "--password", "pass", "--insecure"])
        .args(["--template", "DC0_H0_VM0", "--ip-timeout-secs", "1"])
        .args(["--tenant", tenant, "--worker-id", worker])
        .args(["--workers", "1", "--concurrency", "8"])
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

/// Waits for a runner to exit and returns its `summary:` line's fields.
fn summary(mut proc: Proc, name: &str) -> HashMap<String, String> {
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
    line["summary: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_the_work_and_survive_a_sigkill() {
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
    // govc counts the VMs independently of our SOAP client; without it the
    // test would check less, so it is a missing service like vcsim.
    let govc = vcsim.with_file_name("govc");
    if !govc.exists() {
        return skip(&format!(
            "govc not found at {} (scripts/build-vcsim.sh builds it next to vcsim)",
            govc.display()
        ));
    }
    let bin = runner_binary();
    let db = create_database(&url).await;
    let (_vcsim, vcsim_url) = start_vcsim(&vcsim);
    let tenant = format!("t{}", &Uuid::new_v4().simple().to_string()[..8]);

    let approver = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "a", APPROVALS);
    let victim = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "b", 0);
    let survivor = spawn_runner(&bin, &db.url, &vcsim_url, &tenant, "c", 0);

    // Kill "b" mid-run: once a fifth of the work is done and b holds leases.
    let deadline = Instant::now() + Duration::from_secs(180);
    let held = loop {
        assert!(Instant::now() < deadline, "the run never got going");
        if db.done().await >= (APPROVALS / 5) as i64 {
            let held = db.leased_by("b-w0").await;
            if !held.is_empty() {
                break held;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut victim = victim;
    victim.0.kill().expect("SIGKILL the victim");
    let killed_at = Instant::now();
    victim.0.wait().expect("reap the victim");
    eprintln!("killed worker b holding {} lease(s)", held.len());

    // Its claims are taken over within the lease time (plus a claim poll
    // and scheduling slack).
    let takeover = loop {
        let still_held = db.leased_by("b-w0").await;
        if still_held.is_empty() {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(LEASE_SECS + 10),
            "{} claim(s) of the killed worker were not taken over",
            still_held.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("claims of the killed worker taken over after {takeover:?}");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECS + 2),
        "takeover took {takeover:?}, lease is {LEASE_SECS} s"
    );

    let expected = HashMap::from([
        ("ready".to_owned(), APPROVALS.to_string()),
        ("failed".to_owned(), "0".to_owned()),
        ("vms".to_owned(), APPROVALS.to_string()),
        ("duplicates".to_owned(), "0".to_owned()),
    ]);
    for (name, proc) in [("a", approver), ("c", survivor)] {
        let fields = summary(proc, name);
        for (key, value) in &expected {
            assert_eq!(fields.get(key), Some(value), "runner {name}: {key}");
        }
    }

    // The store, read directly: one Ready per request, one VM stream each.
    let ready: Vec<(String, i64)> = within(
        QUERY_DEADLINE,
        "the Ready events",
        sqlx::query_as(
            "SELECT stream_id, count(*) FROM dvmm_events \
             WHERE stream_type = 'VmRequest' AND event_type = 'VmRequestReady' GROUP BY stream_id",
        )
        .fetch_all(&db.admin),
    )
    .await
    .unwrap();
    assert_eq!(ready.len(), APPROVALS);
    assert!(
        ready.iter().all(|(_, n)| *n == 1),
        "a request became Ready twice"
    );
    let vm_streams: i64 = within(
        QUERY_DEADLINE,
        "the VM streams",
        sqlx::query_scalar(
            "SELECT count(DISTINCT stream_id) FROM dvmm_events WHERE stream_type = 'Vm'",
        )
        .fetch_one(&db.admin),
    )
    .await
    .unwrap();
    assert_eq!(vm_streams, APPROVALS as i64);

    // vcsim, asked by govc (independent of our SOAP client).
    let mut find = Command::new(&govc);
    find.args(["find", "-type", "m", &format!("/DC0/vm/{tenant}")])
        .env("GOVC_URL", vcsim_url.replacen("://", "://user:pass@", 1))
        .env("GOVC_INSECURE", "1");
    let out = output_within(find, Duration::from_secs(60), "govc find");
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
    db.drop().await;
}
