//! The server restarts (`pg_ctl restart`) while appends run: every
//! acknowledged append is there afterwards, every unacknowledged one is there
//! completely or not at all, and the same store keeps working without being
//! rebuilt.
//!
//! This file is its own test binary because a restart cuts every connection
//! to the server: cargo runs test binaries one after another, so no other
//! test is disturbed. It restarts the cluster named by `DVMM_PG_DATADIR`
//! (exported by `scripts/pg-throwaway.sh start`), and never a server it was
//! not told it may restart. Without that variable it starts a throwaway
//! cluster of its own with the same script when `DVMM_REQUIRE_SERVICES=1`
//! (and stops it at the end, also when the test fails), and otherwise skips.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dvmm_core::event::StreamId;
use dvmm_core::ids::EventId;
use dvmm_core::ports::{AppendOutcome, EventStore};
use dvmm_store_postgres::sqlx;
use serde_json::json;
use support::{TestDb, event, services_required, skip, tenant};
use uuid::Uuid;

/// The cluster the test may restart.
struct Cluster {
    /// A superuser URL of the server.
    url: String,
    datadir: String,
    /// `DVMM_PG_BIN`, where `pg_ctl` is.
    bin: Option<String>,
    /// `DVMM_PG_USER`, the data directory's owner.
    user: Option<String>,
    /// Set when the test started the cluster itself: stops it when dropped.
    _own: Option<OwnCluster>,
}

/// A cluster started by this test with `scripts/pg-throwaway.sh start`; it
/// is stopped and removed when this is dropped, so also when an assertion
/// unwinds.
struct OwnCluster {
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("pg-throwaway.sh")
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let stopped = Command::new("bash")
            .arg(script())
            .arg("stop")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !matches!(stopped, Ok(status) if status.success()) {
            eprintln!(
                "could not stop the test's own cluster in {:?}: {stopped:?}",
                self.env.get("DVMM_PG_DATADIR")
            );
        }
    }
}

/// The value of one `export NAME=value` line that the script printed with
/// bash's `printf %q`: plain characters, or backslash escapes.
fn unquote(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '\'' => {}
            c => out.push(c),
        }
    }
    out
}

/// Starts a throwaway cluster; panics saying why when it cannot.
fn start_own_cluster() -> Cluster {
    let output = Command::new("bash")
        .arg(script())
        .arg("start")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("DVMM_REQUIRE_SERVICES=1: cannot run {:?}: {e}", script()));
    let env: HashMap<String, String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .map(|(name, value)| (name.to_owned(), unquote(value)))
        .collect();
    let own = OwnCluster { env };
    let (Some(url), Some(datadir)) = (
        own.env.get("DATABASE_URL").cloned(),
        own.env.get("DVMM_PG_DATADIR").cloned(),
    ) else {
        panic!(
            "DVMM_REQUIRE_SERVICES=1 and no DVMM_PG_DATADIR: starting a throwaway cluster failed \
             ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    Cluster {
        url,
        datadir,
        bin: own.env.get("DVMM_PG_BIN").cloned(),
        user: own.env.get("DVMM_PG_USER").cloned(),
        _own: Some(own),
    }
}

/// The cluster to restart: the one `DVMM_PG_DATADIR` names, a fresh one
/// when services are required, or `None` after reporting the skip.
fn cluster(test: &str) -> Option<Cluster> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(datadir) = env("DVMM_PG_DATADIR") {
        let url = support::database_url(test)?;
        return Some(Cluster {
            url,
            datadir,
            bin: env("DVMM_PG_BIN"),
            user: env("DVMM_PG_USER"),
            _own: None,
        });
    }
    if services_required() {
        return Some(start_own_cluster());
    }
    skip(
        test,
        "DVMM_PG_DATADIR is not set: only a cluster from scripts/pg-throwaway.sh is restarted \
         (with DVMM_REQUIRE_SERVICES=1 the test starts one itself)",
    );
    None
}

/// Runs `pg_ctl restart` as the data directory's owner (pg_ctl refuses root).
fn restart_server(cluster: &Cluster) {
    let datadir = cluster.datadir.as_str();
    let bin = cluster
        .bin
        .clone()
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    let pg_ctl = format!("{bin}/pg_ctl");
    // The server pg_ctl starts inherits its output: send that to the log file
    // next to the data directory (where the script's `start` logs), never to
    // the test's pipes, which it would hold open after the test ends.
    let log = std::path::Path::new(datadir)
        .parent()
        .map(|p| p.join("server.log"))
        .unwrap_or_else(|| std::env::temp_dir().join("dvmm-pg-restart.log"));
    let log = log.to_string_lossy().into_owned();
    let args = [
        "restart", "-D", datadir, "-m", "fast", "-w", "-t", "60", "-l", &log,
    ];
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    let status = if root {
        let owner = cluster.user.clone().unwrap_or_else(|| {
            let out = Command::new("stat")
                .args(["-c", "%U", datadir])
                .output()
                .expect("stat the data directory");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        });
        Command::new("runuser")
            .args(["-u", &owner, "--", &pg_ctl])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    } else {
        Command::new(&pg_ctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    let status = status.expect("run pg_ctl");
    assert!(
        status.success(),
        "pg_ctl restart failed ({status}), see {log}"
    );
}

/// Awaits `future`, failing the test with `what` if it takes over `limit`.
async fn within<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    future: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {}", what()),
    }
}

/// Polls `count` until it reaches `target`.
async fn until_at_least(count: &AtomicUsize, target: usize) {
    while count.load(Ordering::SeqCst) < target {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What one writer saw.
#[derive(Default)]
struct Log {
    stream: Option<StreamId>,
    acknowledged: Vec<Vec<EventId>>,
    in_doubt: Vec<Vec<EventId>>,
    acknowledged_after_restart: usize,
    errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_a_server_restart_and_the_store_reconnects() {
    let test = "appends_survive_a_server_restart_and_the_store_reconnects";
    let Some(cluster) = cluster(test) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let db = TestDb::create_on(&cluster.url).await;
    let store = Arc::new(db.store(16).await);
    let t = tenant();
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    // Per writer: appends acknowledged after the restart. The test waits for
    // each writer to get one, since on a loaded machine a writer may need
    // longer than the others' next 80 appends to get a new connection.
    let acked_after: Arc<Vec<AtomicUsize>> =
        Arc::new((0..8).map(|_| AtomicUsize::new(0)).collect());

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, stop, restarted, acked, acked_after) = (
                store.clone(),
                stop.clone(),
                restarted.clone(),
                acked.clone(),
                acked_after.clone(),
            );
            tokio::spawn(async move {
                // Even writers retry an unacknowledged batch as it was (the
                // store must recognise it if it was applied); odd writers give
                // it up and carry on from the version they find.
                let retry_same_batch = w % 2 == 0;
                let stream = StreamId::new("VmRequest", Uuid::new_v4());
                let mut log = Log {
                    stream: Some(stream.clone()),
                    ..Log::default()
                };
                let mut version = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let batch: Vec<_> = (0..3)
                        .map(|p| event(t, json!({ "writer": w, "append": i, "part": p })))
                        .collect();
                    let ids: Vec<EventId> = batch.iter().map(|e| e.metadata.event_id).collect();
                    loop {
                        let after_restart = restarted.load(Ordering::SeqCst);
                        match store.append(t, &stream, version, batch.clone()).await {
                            Ok(outcome) => {
                                if let AppendOutcome::Appended { new_version, .. } = outcome {
                                    assert_eq!(new_version, version + 3);
                                }
                                version += 3;
                                log.acknowledged.push(ids);
                                acked.fetch_add(1, Ordering::SeqCst);
                                if after_restart {
                                    log.acknowledged_after_restart += 1;
                                    acked_after[w].fetch_add(1, Ordering::SeqCst);
                                }
                                break;
                            }
                            Err(e) => {
                                assert!(
                                    e.is_retryable() && !e.is_conflict(),
                                    "a restart gives retryable backend errors, got {e:?}"
                                );
                                log.errors.push(e.to_string());
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                if retry_same_batch {
                                    continue;
                                }
                                log.in_doubt.push(ids);
                                version = loop {
                                    match store.load(t, &stream).await {
                                        Ok(events) => break events.len() as u64,
                                        Err(e) => {
                                            assert!(e.is_retryable(), "{e:?}");
                                            tokio::time::sleep(Duration::from_millis(20)).await;
                                        }
                                    }
                                };
                                break;
                            }
                        }
                    }
                }
                log
            })
        })
        .collect();

    // Let the writers get going, restart under load, then keep writing.
    // Every wait has a deadline: a store that never reconnects fails the
    // test instead of hanging it.
    within(
        Duration::from_secs(60),
        || {
            format!(
                "40 acknowledged appends before the restart (got {})",
                acked.load(Ordering::SeqCst)
            )
        },
        until_at_least(&acked, 40),
    )
    .await;
    // Hold every append at its insert while the server goes down, so the
    // restart cuts appends in flight. Left to timing, it can fall between
    // two appends of every writer (seen on a loaded machine: 0 errors), and
    // the test would then prove nothing about appends cut off by it.
    let mut blocker = db
        .admin
        .begin()
        .await
        .expect("begin the blocking transaction");
    sqlx::query("LOCK TABLE dvmm_events IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock the events table against inserts");
    let admin = db.admin.clone();
    within(
        Duration::from_secs(30),
        || "a writer's append to wait for the table lock".to_owned(),
        async move {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )
                .fetch_one(&admin)
                .await
                .expect("count waiting backends");
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    let restarting = cluster.clone();
    within(
        Duration::from_secs(120),
        || "pg_ctl restart".to_owned(),
        tokio::task::spawn_blocking(move || restart_server(&restarting)),
    )
    .await
    .expect("restart");
    // Its connection died with the server; dropping it only returns that.
    drop(blocker);
    restarted.store(true, Ordering::SeqCst);
    let at_restart = acked.load(Ordering::SeqCst);
    within(
        Duration::from_secs(120),
        || {
            format!(
                "80 more acknowledged appends after the restart (got {})",
                acked.load(Ordering::SeqCst) - at_restart
            )
        },
        until_at_least(&acked, at_restart + 80),
    )
    .await;
    within(
        Duration::from_secs(120),
        || {
            let per_writer: Vec<usize> = acked_after
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect();
            format!(
                "every writer to append again after the restart (acknowledged per writer: {per_writer:?})"
            )
        },
        async {
            while acked_after.iter().any(|c| c.load(Ordering::SeqCst) == 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);

    let mut logs: Vec<Log> = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        let log = within(
            Duration::from_secs(60),
            || format!("writer {w} to finish its last append"),
            writer,
        )
        .await
        .expect("writer");
        logs.push(log);
    }
    let errors: usize = logs.iter().map(|l| l.errors.len()).sum();
    eprintln!(
        "restart: {} appends acknowledged, {} in doubt, {errors} retryable errors, e.g. {:?}",
        logs.iter().map(|l| l.acknowledged.len()).sum::<usize>(),
        logs.iter().map(|l| l.in_doubt.len()).sum::<usize>(),
        logs.iter().flat_map(|l| l.errors.first()).next()
    );
    let in_doubt: usize = logs.iter().map(|l| l.in_doubt.len()).sum();
    // Otherwise the restart fell between two appends of every writer and the
    // test proved nothing about appends cut off by it.
    assert!(
        errors > 0,
        "no writer saw the restart: no append failed ({in_doubt} in doubt)"
    );
    for log in &logs {
        assert!(
            log.acknowledged_after_restart > 0,
            "every writer appended again after the restart (the pool reconnected)"
        );
        let stream = log.stream.as_ref().expect("stream");
        let stored = store.load(t, stream).await.expect("load after the restart");
        for (i, e) in stored.iter().enumerate() {
            assert_eq!(e.version, i as u64 + 1, "versions stay contiguous");
        }
        let ids: HashSet<EventId> = stored.iter().map(|e| e.metadata.event_id).collect();
        assert_eq!(ids.len(), stored.len(), "no event is stored twice");
        let mut expected_max = 0;
        for batch in &log.acknowledged {
            assert!(
                batch.iter().all(|id| ids.contains(id)),
                "an acknowledged append is missing"
            );
            expected_max += batch.len();
        }
        for batch in &log.in_doubt {
            let present = batch.iter().filter(|id| ids.contains(id)).count();
            assert!(
                present == 0 || present == batch.len(),
                "an unacknowledged append is partly stored ({present} of {})",
                batch.len()
            );
            expected_max += present;
        }
        assert_eq!(
            stored.len(),
            expected_max,
            "nothing is stored that no writer sent"
        );
    }
    db.drop().await;
}
