//! `cargo run --example lifecycle` on the simulator: the walk through
//! failure, cleanup, retry, status sync and decommission finishes, prints
//! the timeline in order and leaves no VM behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the example (usually a no-op: the test run built it) within a
/// deadline that a cold build on a busy 2-core machine fits in.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--quiet",
        "--example",
        "lifecycle",
        // The features the suite is built with (scripts/test.sh), so the
        // example reuses its artifacts instead of rebuilding the crates.
        "--all-features",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = run_within(build, Duration::from_secs(900), "building the example").status;
    assert!(status.success(), "building the lifecycle example failed");
    let bin = profile_dir.join("examples/lifecycle");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// Runs `command` to its end, killing it and failing the test if that
/// takes longer than `limit`.
fn run_within(mut command: Command, limit: Duration, what: &str) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait for the child").is_some() {
            return child.wait_with_output().expect("the child's output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gave up after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_lifecycle_example_walks_one_request_and_leaves_no_vm() {
    let bin = example_binary();
    let output = run_within(
        Command::new(bin),
        Duration::from_secs(120),
        "the lifecycle example",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        output.status
    );
    let timeline: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != "timeline:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        timeline,
        [
            "Created",
            "Approved",
            "ProvisioningStarted",
            "CustomizingGuest",
            "ProvisioningFailed",
            "PartialVmRemoved",
            "RetryRequested",
            "ProvisioningStarted",
            "CustomizingGuest",
            "VmReady",
            "StatusChanged",
            "VmDeleted",
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("Provisioning failed – partial VM removed"),
        "{stdout}"
    );
    assert!(stdout.contains("status sync: Running"), "{stdout}");
    assert!(
        stdout.contains("vCenter: no VM of this run is left"),
        "{stdout}"
    );
}
