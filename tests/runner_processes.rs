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

mod processes;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dvmm::store::postgres::sqlx;
use processes::*;
use uuid::Uuid;

const APPROVALS: usize = 300;
const LEASE_SECS: u64 = 3;

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
    let _player = play_customizations(&vcsim_url);
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
