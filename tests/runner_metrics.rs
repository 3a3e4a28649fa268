//! The runner example serves dvmm's metrics in Prometheus text format
//! (`--metrics-addr`): a scrape after a run on the simulator finds the
//! provisioning, vSphere-side and runner series, named as the README's table
//! says, with the queue's depth per state. The library itself only records
//! through the `metrics` facade.

mod processes;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use processes::{Proc, runner_binary};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// One plain HTTP/1.0 GET, so the test needs no HTTP client.
fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}

#[test]
fn the_runner_example_serves_the_metrics_it_recorded() {
    let port = free_port();
    let mut child = Proc(
        Command::new(runner_binary())
            .args(["--approve", "20", "--workers", "2", "--fault-rate", "0.2"])
            .args(["--max-secs", "120", "--no-progress"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--metrics-linger-secs", "60"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the runner example"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let summary = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the runner printed its summary in time");
        if line.starts_with("summary: ") {
            break line;
        }
    };
    assert!(summary.contains("ready=20"), "{summary}");

    let answer = scrape(port);
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    for series in [
        "dvmm_provisioning_duration_seconds",
        r#"dvmm_provisionings_total{outcome="ready"}"#,
        r#"outcome="deferred""#,
        "dvmm_runner_in_flight",
        "dvmm_runner_held_jobs",
        "dvmm_runner_parked_endpoints",
        "dvmm_runner_outage_waits_total",
        r#"error_code="Transport""#,
    ] {
        assert!(
            answer.contains(series),
            "no {series} in the scrape:\n{answer}"
        );
    }
    // A Prometheus counter line: name{labels} value.
    let ready: f64 = answer
        .lines()
        .find(|l| l.starts_with(r#"dvmm_provisionings_total{outcome="ready"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("a ready count");
    assert!(ready >= 20.0, "ready provisionings counted: {ready}");
    // The queue's depth, read once more as each runner stopped: every job
    // finished, none left behind in any other state.
    let depth = |state: &str| -> f64 {
        let series = format!(r#"dvmm_queue_jobs{{state="{state}"}}"#);
        answer
            .lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the scrape:\n{answer}"))
    };
    assert_eq!(depth("done"), 20.0, "finished jobs");
    for state in ["queued", "waiting", "leased", "expired"] {
        assert_eq!(depth(state), 0.0, "{state} jobs after the run");
    }
    assert!(
        !answer.contains("tenant="),
        "the tenant label is opt-in:\n{answer}"
    );
}
