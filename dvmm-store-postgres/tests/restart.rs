//! The server restarts (`pg_ctl restart`) while appends run: every
//! acknowledged append is there afterwards, every unacknowledged one is there
//! completely or not at all, and the same store keeps working without being
//! rebuilt.
//!
//! This file is its own test binary because a restart cuts every connection
//! to the server: cargo runs test binaries one after another, so no other
//! test is disturbed. It needs `DVMM_PG_DATADIR` (exported by
//! `scripts/pg-throwaway.sh start`) and skips without it.

mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dvmm_core::event::StreamId;
use dvmm_core::ids::EventId;
use dvmm_core::ports::{AppendOutcome, EventStore};
use serde_json::json;
use support::{TestDb, event, tenant};
use uuid::Uuid;

/// Runs `pg_ctl restart` as the data directory's owner (pg_ctl refuses root).
fn restart_server(datadir: &str) {
    let bin = std::env::var("DVMM_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
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
        let owner = std::env::var("DVMM_PG_USER").unwrap_or_else(|_| {
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
    let Ok(datadir) = std::env::var("DVMM_PG_DATADIR") else {
        // Restarting needs the server's data directory, which only a cluster
        // started by scripts/pg-throwaway.sh tells us; an external server is
        // never restarted by tests.
        eprintln!(
            "skipping appends_survive_a_server_restart: DVMM_PG_DATADIR is not set \
             (only a cluster from scripts/pg-throwaway.sh is restarted)"
        );
        return;
    };
    let Some(db) = TestDb::create("appends_survive_a_server_restart").await else {
        return;
    };
    let store = Arc::new(db.store(16).await);
    let t = tenant();
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, stop, restarted, acked) = (
                store.clone(),
                stop.clone(),
                restarted.clone(),
                acked.clone(),
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
    while acked.load(Ordering::SeqCst) < 40 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dir = datadir.clone();
    tokio::task::spawn_blocking(move || restart_server(&dir))
        .await
        .expect("restart");
    restarted.store(true, Ordering::SeqCst);
    let at_restart = acked.load(Ordering::SeqCst);
    while acked.load(Ordering::SeqCst) < at_restart + 80 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);

    let mut logs: Vec<Log> = Vec::new();
    for w in writers {
        logs.push(w.await.expect("writer"));
    }
    let errors: usize = logs.iter().map(|l| l.errors.len()).sum();
    eprintln!(
        "restart: {} appends acknowledged, {} in doubt, {errors} retryable errors, e.g. {:?}",
        logs.iter().map(|l| l.acknowledged.len()).sum::<usize>(),
        logs.iter().map(|l| l.in_doubt.len()).sum::<usize>(),
        logs.iter().flat_map(|l| l.errors.first()).next()
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
