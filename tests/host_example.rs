//! The host example (`examples/host.rs`), driven over HTTP as a portal
//! would: it holds one service type chosen by its config file, runs the
//! runner by handle, lists requests page by page from the read model and
//! serves metrics. Memory and the simulator always; PostgreSQL (set up in one
//! call by the example) with `DATABASE_URL`.

mod processes;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use processes::{Proc, skip, workspace};

const TENANT: &str = "6f1c1d2e-0000-4000-8000-0000000000bb";

fn host_binary() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args(["build", "--quiet", "--example", "host", "--all-features"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the host example failed");
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples/host")
}

/// One HTTP/1.0 exchange; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the host");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn drive(store: serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("dvmm-host-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let config = dir.join("host.json");
    let config_json = serde_json::json!({
        "listen": "127.0.0.1:0",
        "store": store,
        "vsphere": { "kind": "simulator" },
        "tenants": [{
            "tenant_id": TENANT, "slug": "acme",
            "vcenter": { "url": "https://vc.example.com/sdk", "username": "svc", "password": "pw" },
            "datacenter": "DC0", "cluster": "DC0_C0", "datastore": "LocalDS_0",
            "template": "ubuntu-22.04-template", "network": "VM Network",
            "timeouts": { "ip_wait_secs": 1 }
        }]
    });
    std::fs::write(&config, config_json.to_string()).expect("write the config");
    let mut child = Proc(
        Command::new(host_binary())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the host example"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the host says where it listens");
    let port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));

    // File five requests, approve four.
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, body) = http(
            port,
            "POST",
            &format!("/tenants/{TENANT}/requests"),
            Some(&format!(
                r#"{{"project_prefix":"web","requested_name":"app{i:02}","size":"S","justification":"load test"}}"#
            )),
        );
        assert_eq!(status, 201, "{body}");
        ids.push(json(&body)["id"].as_str().expect("an id").to_owned());
    }
    for id in &ids[..4] {
        let (status, body) = http(
            port,
            "POST",
            &format!("/tenants/{TENANT}/requests/{id}/approve"),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    // A bad name is a typed error, not a 500.
    let (status, body) = http(
        port,
        "POST",
        &format!("/tenants/{TENANT}/requests"),
        Some(
            r#"{"project_prefix":"web","requested_name":"Bad Name!","size":"S","justification":"x"}"#,
        ),
    );
    assert_eq!(status, 422, "{body}");

    // The runner (spawned by handle) makes them ready.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = http(
            port,
            "GET",
            &format!("/tenants/{TENANT}/requests?status=Ready&limit=50"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        if json(&body)["items"].as_array().map_or(0, Vec::len) == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "four requests never became ready: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Page through everything, two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/tenants/{TENANT}/requests?limit=2&cursor={c}"),
            None => format!("/tenants/{TENANT}/requests?limit=2"),
        };
        let (status, body) = http(port, "GET", &path, None);
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        for item in page["items"].as_array().expect("items") {
            seen.push(item["request_id"].as_str().expect("an id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every request once, newest first");
    let (status, _) = http(
        port,
        "GET",
        &format!("/tenants/{TENANT}/requests?cursor=garbage"),
        None,
    );
    assert_eq!(status, 400);

    let (status, body) = http(
        port,
        "GET",
        &format!("/tenants/{TENANT}/requests/{}/timeline", ids[0]),
        None,
    );
    assert_eq!(status, 200);
    assert!(body.contains("VM ready"), "{body}");
    let (status, body) = http(port, "GET", "/health", None);
    assert_eq!(status, 200);
    let health = json(&body);
    assert_eq!(health["running"], true, "{body}");
    // The runner reads the queue's depth as it starts, so it is known by now.
    for state in ["queued", "waiting", "leased", "expired", "done"] {
        assert!(health["queue"][state].is_u64(), "{state}: {body}");
    }
    let (status, body) = http(port, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"dvmm_provisionings_total{outcome="ready"}"#),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_host_example_serves_a_portal_on_memory() {
    drive(serde_json::json!({ "kind": "memory" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_example_serves_a_portal_on_postgres() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        return skip("DATABASE_URL is not set (eval \"$(scripts/pg-throwaway.sh start)\")");
    };
    let db = processes::create_database(&url).await;
    let store = serde_json::json!({
        "kind": "postgres",
        "admin_url": db.url,
        "login": format!("dvmm_runner_{}", db.name),
        "password": "host-example-test"
    });
    tokio::task::spawn_blocking(move || drive(store))
        .await
        .expect("the host run");
    db.drop().await;
}
