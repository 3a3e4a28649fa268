//! What the multi-process tests share: services required or skipped (in
//! `DVMM_SKIP_LOG`), deadlines, vcsim and the runner example as child
//! processes killed on drop, and a database of their own per test.

#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use dvmm::store::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use dvmm::store::postgres::sqlx::{self, PgPool};
use uuid::Uuid;

pub fn required() -> bool {
    std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// Fails under `DVMM_REQUIRE_SERVICES=1`; otherwise prints why and appends
/// `<test name>: <why>` to the file named by `DVMM_SKIP_LOG`, so the skip
/// shows in the suite's summary instead of passing as `ok`.
pub fn skip(why: &str) {
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
pub const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test with what it was waiting for if
/// `limit` passes first.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {limit:?} waiting for {what}"),
    }
}

pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn vcsim_bin() -> PathBuf {
    std::env::var_os("VCSIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/vcsim/bin/vcsim"))
}

/// A process killed when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts vcsim on a free port; returns it with its SDK URL.
pub fn start_vcsim(bin: &Path) -> (Proc, String) {
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
pub fn runner_binary() -> PathBuf {
    example_binary("runner")
}

/// Example `name`, built with the features of this test run.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(workspace())
        .args(["build", "--quiet", "--example", name, "--all-features"]);
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
            "building the {name} example took over {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "building the {name} example failed");
    let bin = profile_dir.join("examples").join(name);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub admin: PgPool,
    pub server: PgConnectOptions,
}

pub async fn create_database(url: &str) -> TestDb {
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
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&maintenance),
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
    pub async fn drop(self) {
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
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&maintenance),
        )
        .await
        .expect("drop the test database");
        // The example's login for this database (see examples/runner.rs).
        within(
            QUERY_DEADLINE,
            "DROP ROLE",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP ROLE IF EXISTS dvmm_runner_{}",
                self.name
            )))
            .execute(&maintenance),
        )
        .await
        .expect("drop the example's role");
    }

    /// Jobs `worker` holds a lease on. Before the runners have created
    /// `dvmm_jobs` (SQLSTATE 42P01) there are none; any other database error
    /// fails the test, since an empty answer would read as a takeover.
    pub async fn leased_by(&self, worker: &str) -> HashSet<Uuid> {
        let result: Result<Vec<Uuid>, _> = within(
            QUERY_DEADLINE,
            "the leases of a worker",
            sqlx::query_scalar(
                "SELECT request_id FROM dvmm_jobs WHERE state = 'leased' AND worker = $1",
            )
            .bind(worker)
            .fetch_all(&self.admin),
        )
        .await;
        match result {
            Ok(ids) => ids.into_iter().collect(),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => HashSet::new(),
            Err(e) => panic!("reading the leases of {worker}: {e}"),
        }
    }

    /// Jobs done so far. Before the runners have created `dvmm_jobs`
    /// (undefined table, SQLSTATE 42P01) that is 0; any other error fails
    /// the test.
    pub async fn done(&self) -> i64 {
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
pub fn output_within(mut command: Command, limit: Duration, what: &str) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.output());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("gave up after {limit:?} waiting for {what}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// Plays guests that customize at once for every VM vcsim powers on below
/// `DC0/vm` (vcsim records no guest customization, and the runners wait for
/// its outcome), from a session of this process. Stops with the test's
/// runtime; the client is returned to keep its session alive.
pub fn play_customizations(
    vcsim_url: &str,
) -> (dvmm::vsphere::SoapVsphere, tokio::task::JoinHandle<()>) {
    // Back within a second of vCenter's return, not the default 30 s.
    let client = dvmm::vsphere::SoapVsphere::new(dvmm::vsphere::SoapOptions {
        breaker_cooldown: Duration::from_secs(1),
        ..dvmm::vsphere::SoapOptions::default()
    });
    let endpoint = dvmm::core::config::VcenterEndpoint {
        url: vcsim_url.to_owned(),
        username: "user".into(),
        password: dvmm::core::config::Secret::new("pass"),
        insecure: true,
        thumbprint: None,
        allow_plain_http: false,
    };
    let session = client.session_for(&endpoint).expect("player session");
    let player = dvmm_vsphere::guest_player::play_customizations(session, "DC0/vm".into());
    (client, player)
}
