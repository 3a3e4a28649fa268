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

mod processes;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dvmm::store::postgres::sqlx;
use processes::*;
use uuid::Uuid;

const APPROVALS: usize = 120;
const LEASE_SECS: u64 = 3;

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
    let _player = play_customizations(&vcsim_url);
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
    let summaries: Vec<_> = [("a", approver), ("b", runner), ("e", caller)]
        .into_iter()
        .map(|(name, proc)| (name, summary(proc, name)))
        .collect();
    // Any failure recorded is printed in full before the checks, so a red
    // run says which step failed and why.
    let recorded: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT stream_id, event_type, payload::text FROM dvmm_events \
         WHERE event_type IN ('VmProvisioningFailed', 'VmRequestProvisioningFailed') \
         ORDER BY position",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    for (stream, kind, payload) in &recorded {
        eprintln!("recorded {kind} on {stream}: {payload}");
    }
    for (name, (fields, direct)) in summaries {
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
