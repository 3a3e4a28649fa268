//! The SOAP client's failure paths, without vcsim: a full `create_vm` on a
//! scripted vCenter (re-login, refused logins, lost clone answers, retries,
//! what reaches the log), and the HTTP transport against tiny servers on
//! 127.0.0.1 that misbehave (endless answers, trickling answers, proxy
//! errors, refused connections).

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_core::spec::{VmProvisioningResult, VmSpec};
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::Transport;
use dvmm_vsphere::transport::scripted::{ScriptedTransport, Step};
use dvmm_vsphere::{SoapOptions, SoapVsphere};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PASSWORD: &str = "Sup3r-Secret-pw!";
const WRONG_PASSWORD: &str = "Wr0ng-Secret-pw!";
const VM_PATH: &str = "DC0/vm/acme/web/web-01";

fn endpoint(url: &str, password: &str) -> VcenterEndpoint {
    VcenterEndpoint {
        url: url.into(),
        username: "svc-dvmm".into(),
        password: Secret::new(password),
        insecure: true,
        thumbprint: None,
        // The misbehaving servers below speak plain HTTP on 127.0.0.1.
        allow_plain_http: true,
    }
}

fn vm_spec(password: &str) -> VmSpec {
    let mut spec = common::spec(
        endpoint("https://vc.example.test/sdk", password),
        "acme/web",
        "web-01",
        "VM Network",
    );
    // These tests are about the transport; the scripted vCenter records no
    // customization events (the customization wait is tested on vcsim).
    spec.customization_timeout = std::time::Duration::ZERO;
    spec
}

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

/// What the scripted vCenter knows besides its fixtures.
#[derive(Debug, Default)]
struct World {
    /// Whether the VM of the spec exists (a clone happened).
    vm_exists: bool,
    /// The next clone happens but its answer is lost.
    lose_clone_answer: bool,
    /// The dvmm VM id the cloned VM carries.
    vm_id: String,
}

fn moref(method: &str, kind: &str, value: &str) -> Step {
    Step::ok(
        method,
        &format!(r#"<returnval type="{kind}">{value}</returnval>"#),
    )
}

/// A vCenter with vcsim's inventory, answering from recorded fixtures.
/// Logins succeed only with [`PASSWORD`].
fn fake_vcenter(script: &ScriptedTransport, spec: &VmSpec) -> Arc<Mutex<World>> {
    let world = Arc::new(Mutex::new(World {
        vm_id: spec.vm_id.to_string(),
        ..World::default()
    }));
    let state = world.clone();
    script.fallback(move |call| {
        let body = call.body.as_str();
        let mut world = state.lock().unwrap();
        match call.method {
            "RetrieveServiceContent" => Step::Answer(fixture("RetrieveServiceContent")),
            "Login" if body.contains(&format!("<password>{PASSWORD}</password>")) => {
                Step::Answer(fixture("Login"))
            }
            "Login" => Step::Answer(fixture("Login-InvalidLogin")),
            "Logout" => Step::Answer(fixture("Logout")),
            "FindByInventoryPath" => {
                let path = between(body, "<inventoryPath>", "</inventoryPath>").unwrap_or("");
                let m = "FindByInventoryPath";
                match path {
                    VM_PATH if world.vm_exists => moref(m, "VirtualMachine", "vm-63"),
                    VM_PATH => Step::ok(m, ""),
                    "DC0" => moref(m, "Datacenter", "datacenter-2"),
                    p if p.ends_with("DC0_C0_RP0_VM0") => moref(m, "VirtualMachine", "vm-63"),
                    p if p.contains("/host/") => moref(m, "ResourcePool", "resgroup-1"),
                    p if p.contains("/datastore/") => moref(m, "Datastore", "datastore-1"),
                    p if p.contains("/network/") => moref(m, "Network", "network-7"),
                    _ => moref(m, "Folder", "group-v3"),
                }
            }
            "RetrievePropertiesEx" if body.contains("<type>Task</type>") => Step::ok(
                "RetrievePropertiesEx",
                concat!(
                    r#"<returnval><objects><obj type="Task">task-1</obj>"#,
                    r#"<propSet><name>info.state</name><val xsi:type="TaskInfoState">success</val></propSet>"#,
                    r#"<propSet><name>info.result</name><val type="VirtualMachine" xsi:type="ManagedObjectReference">vm-63</val></propSet>"#,
                    r#"</objects></returnval>"#
                ),
            ),
            "RetrievePropertiesEx" if !body.contains("config.hardware") => Step::ok(
                "RetrievePropertiesEx",
                &format!(
                    concat!(
                        r#"<returnval><objects><obj type="VirtualMachine">vm-63</obj>"#,
                        r#"<propSet><name>config.extraConfig</name><val xsi:type="ArrayOfOptionValue">"#,
                        r#"<OptionValue xsi:type="OptionValue"><key>dvmm.vmId</key>"#,
                        r#"<value xsi:type="xsd:string">{}</value></OptionValue></val></propSet>"#,
                        r#"</objects></returnval>"#
                    ),
                    world.vm_id
                ),
            ),
            "RetrievePropertiesEx" => Step::Answer(
                fixture("RetrievePropertiesEx-vm")
                    .replace("<powerState>poweredOn", "<powerState>poweredOff"),
            ),
            "CloneVM_Task" => {
                world.vm_exists = true;
                if std::mem::take(&mut world.lose_clone_answer) {
                    Step::transport("connection reset by peer")
                } else {
                    moref("CloneVM_Task", "Task", "task-1")
                }
            }
            "ReconfigVM_Task" | "CustomizeVM_Task" | "PowerOnVM_Task" => {
                moref(call.method, "Task", "task-2")
            }
            "CreateFolder" => Step::Answer(fixture("CreateFolder")),
            "CreatePropertyCollector" => Step::Answer(fixture("CreatePropertyCollector")),
            "CreateFilter" => Step::Answer(fixture("CreateFilter")),
            "WaitForUpdatesEx" => Step::Answer(fixture("WaitForUpdatesEx-change")),
            "DestroyPropertyCollector" => Step::Answer(fixture("DestroyPropertyCollector")),
            other => Step::Error(VsphereError::Protocol {
                message: format!("the fake vCenter does not know {other}"),
            }),
        }
    });
    world
}

fn options() -> SoapOptions {
    SoapOptions {
        retry_base_delay: Duration::from_millis(100),
        max_retry_delay: Duration::from_secs(1),
        ..SoapOptions::default()
    }
}

fn client(script: &ScriptedTransport, options: SoapOptions) -> SoapVsphere {
    let script = script.clone();
    SoapVsphere::with_connector(
        options,
        move |_: &str,
              _: &TlsPolicy,
              _: &SoapOptions|
              -> Result<Arc<dyn Transport>, VsphereError> { Ok(Arc::new(script.clone())) },
    )
}

async fn create(
    vsphere: &SoapVsphere,
    spec: &VmSpec,
) -> Result<VmProvisioningResult, VsphereError> {
    tokio::time::timeout(Duration::from_secs(600), vsphere.create_vm(spec))
        .await
        .expect("create_vm on the scripted vCenter ended")
}

#[tokio::test(start_paused = true)]
async fn create_vm_on_the_scripted_vcenter_clones_once_and_finds_the_ip() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    fake_vcenter(&script, &spec);
    let vsphere = client(&script, options());
    let result = create(&vsphere, &spec).await.expect("provisioned");
    assert_eq!(result.vmware_vm_id.as_str(), "vm-63");
    assert_eq!(result.ip_address, Some("10.0.0.42".parse().unwrap()));
    assert_eq!(script.count("CloneVM_Task"), 1);
    assert_eq!(script.count("Login"), 1);
    for method in ["PowerOnVM_Task", "CustomizeVM_Task", "WaitForUpdatesEx"] {
        assert_eq!(script.count(method), 1, "{method}");
    }
    assert_eq!(vsphere.request_count(), script.requests().len() as u64);
}

#[tokio::test(start_paused = true)]
async fn a_lost_clone_answer_adopts_the_vm_the_clone_made() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    let world = fake_vcenter(&script, &spec);
    world.lock().unwrap().lose_clone_answer = true;
    let vsphere = client(&script, options());
    let result = create(&vsphere, &spec).await.expect("adopted");
    assert_eq!(result.vmware_vm_id.as_str(), "vm-63");
    assert_eq!(script.count("CloneVM_Task"), 1, "no second clone");
}

#[tokio::test(start_paused = true)]
async fn a_lost_clone_answer_without_a_vm_clones_exactly_once_more() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    fake_vcenter(&script, &spec);
    // The request never reached vCenter: no VM appeared.
    script.push("CloneVM_Task", Step::transport("connection reset by peer"));
    let vsphere = client(&script, options());
    create(&vsphere, &spec).await.expect("provisioned");
    assert_eq!(script.count("CloneVM_Task"), 2);

    // Lost twice: the second loss goes up (the runner decides), after
    // exactly two clones.
    let script = ScriptedTransport::new();
    fake_vcenter(&script, &spec);
    script
        .push("CloneVM_Task", Step::transport("connection reset by peer"))
        .push("CloneVM_Task", Step::transport("connection reset by peer"));
    let vsphere = client(&script, options());
    let err = create(&vsphere, &spec).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(script.count("CloneVM_Task"), 2);
}

#[tokio::test(start_paused = true)]
async fn transport_failures_are_retried_only_for_calls_safe_to_repeat() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    fake_vcenter(&script, &spec);
    script
        .push("FindByInventoryPath", Step::transport("connection refused"))
        .push("FindByInventoryPath", Step::transport("connection reset"));
    let vsphere = client(&script, options());
    create(&vsphere, &spec).await.expect("retried through");
    let methods = script.methods();
    let first_find = methods
        .iter()
        .position(|m| *m == "FindByInventoryPath")
        .unwrap();
    assert_eq!(
        &methods[first_find..first_find + 3],
        ["FindByInventoryPath"; 3],
        "the same lookup, sent three times"
    );

    // PowerOnVM_Task is not repeated blindly: one transport failure ends
    // the call.
    let script = ScriptedTransport::new();
    fake_vcenter(&script, &spec);
    script.push("PowerOnVM_Task", Step::transport("connection reset"));
    let vsphere = client(&script, options());
    let err = create(&vsphere, &spec).await.unwrap_err();
    assert!(matches!(err, VsphereError::Transport { .. }), "{err:?}");
    assert_eq!(script.count("PowerOnVM_Task"), 1);
    assert!(
        script.requests().iter().all(|r| r.idempotent
            != matches!(
                r.method,
                "CloneVM_Task"
                    | "PowerOnVM_Task"
                    | "CreateFolder"
                    | "CreateFilter"
                    | "DestroyPropertyCollector"
            )),
        "idempotence flags"
    );

    // A retried call gives up after max_retries.
    let script = ScriptedTransport::new();
    fake_vcenter(&script, &spec);
    for _ in 0..10 {
        script.push(
            "RetrieveServiceContent",
            Step::transport("connection refused"),
        );
    }
    let vsphere = client(&script, options());
    let err = create(&vsphere, &spec).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(script.requests().len(), 4, "one try and three retries");
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_logs_in_again_exactly_once() {
    // As a fault.
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    fake_vcenter(&script, &spec);
    script.push("FindByInventoryPath", Step::fault("NotAuthenticated"));
    let vsphere = client(&script, options());
    create(&vsphere, &spec).await.expect("logged in again");
    assert_eq!(script.count("Login"), 2);

    // Inside RetrievePropertiesEx's missingSet, with HTTP 200.
    let script = ScriptedTransport::new();
    fake_vcenter(&script, &spec);
    script.push(
        "RetrievePropertiesEx",
        Step::Answer(fixture("RetrievePropertiesEx-NotAuthenticated")),
    );
    let vsphere = client(&script, options());
    create(&vsphere, &spec).await.expect("logged in again");
    assert_eq!(script.count("Login"), 2);

    // A server that refuses the new session too: no login loop.
    let script = ScriptedTransport::new();
    fake_vcenter(&script, &spec);
    script
        .push("FindByInventoryPath", Step::fault("NotAuthenticated"))
        .push("FindByInventoryPath", Step::fault("NotAuthenticated"));
    let vsphere = client(&script, options());
    let err = create(&vsphere, &spec).await.unwrap_err();
    assert_eq!(err, VsphereError::NotAuthenticated);
    assert_eq!(script.count("Login"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_wrong_password_neither_breaks_a_tenant_sharing_the_user_nor_floods_sso() {
    let script = ScriptedTransport::new();
    let good = vm_spec(PASSWORD);
    let mut bad = vm_spec(WRONG_PASSWORD);
    bad.endpoint.url = good.endpoint.url.clone();
    fake_vcenter(&script, &good);
    let opts = options();
    let pause = opts.login_backoff_base;
    let vsphere = client(&script, opts);

    let err = create(&vsphere, &bad).await.unwrap_err();
    assert!(matches!(err, VsphereError::InvalidLogin { .. }), "{err:?}");
    create(&vsphere, &good)
        .await
        .expect("the other tenant's session is its own");
    assert_eq!(script.count("Login"), 2);

    // A queue of jobs with the wrong password: no further Login for a while.
    for _ in 0..5 {
        let err = create(&vsphere, &bad).await.unwrap_err();
        assert!(matches!(err, VsphereError::InvalidLogin { .. }), "{err:?}");
    }
    assert_eq!(script.count("Login"), 2, "refused logins pause");
    tokio::time::sleep(pause).await;
    let _ = create(&vsphere, &bad).await;
    assert_eq!(script.count("Login"), 3, "tries again after the pause");
    // The pause doubles: right after a second refusal there is none.
    tokio::time::sleep(pause).await;
    let _ = create(&vsphere, &bad).await;
    assert_eq!(script.count("Login"), 3, "the second pause is longer");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn trace_output_holds_no_password_and_no_login_body() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    fake_vcenter(&script, &spec);
    // A re-login halfway through…
    script.push("FindByInventoryPath", Step::fault("NotAuthenticated"));
    let vsphere = client(&script, options());
    create(&vsphere, &spec).await.expect("provisioned");
    // …and a refused login.
    let mut bad = vm_spec(WRONG_PASSWORD);
    bad.endpoint.url = spec.endpoint.url.clone();
    assert!(create(&vsphere, &bad).await.is_err());
    vsphere.shutdown().await;

    assert_eq!(script.count("Login"), 3, "login, re-login, refused login");
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture saw the logins: a check that could fail.
    assert!(text.contains("logged in to vCenter"), "{text}");
    assert!(text.contains("logging in again"), "{text}");
    assert!(text.contains("refused the login"), "{text}");
    assert!(text.contains("TRACE") || text.contains("DEBUG"), "{text}");
    for secret in [
        PASSWORD,
        WRONG_PASSWORD,
        "<password>",
        "<userName>",
        "Login xmlns",
    ] {
        assert!(!text.contains(secret), "{secret:?} reached the log");
    }
    let _ = std::io::stderr().flush();
}

/// A one-shot HTTP server on 127.0.0.1: every connection gets `serve`.
async fn server<F, Fut>(serve: F) -> (String, Arc<Mutex<u32>>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/sdk", listener.local_addr().unwrap());
    let connections = Arc::new(Mutex::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            // Read the request head (and whatever body came with it).
            let mut buf = vec![0u8; 64 * 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            tokio::spawn(serve(stream));
        }
    });
    (url, connections)
}

const HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n";
const OPEN: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><RetrieveServiceContentResponse xmlns="urn:vim25"><returnval>"#;

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn plain_http(url: &str) -> VmSpec {
    let mut spec = vm_spec(PASSWORD);
    spec.endpoint.url = url.to_owned();
    spec
}

#[tokio::test]
async fn an_endless_answer_stops_at_the_size_cap() {
    let (url, connections) = server(|mut stream| async move {
        let _ = stream.write_all(HEAD.as_bytes()).await;
        let _ = stream.write_all(&chunk(OPEN.as_bytes())).await;
        let block = chunk(&b"<rootFolder type=\"Folder\">group-d1</rootFolder>".repeat(1000));
        while stream.write_all(&block).await.is_ok() {}
    })
    .await;
    let limit = 4 * 1024 * 1024;
    let vsphere = SoapVsphere::new(SoapOptions {
        max_answer_bytes: limit,
        ..options()
    });
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        vsphere.create_vm(&plain_http(&url)),
    )
    .await
    .expect("the endless answer was cut off")
    .unwrap_err();
    assert_eq!(err, VsphereError::AnswerTooLarge { limit_bytes: limit });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        *connections.lock().unwrap(),
        1,
        "a too-large answer is not retried"
    );
}

#[tokio::test]
async fn a_trickling_answer_fails_at_the_call_deadline() {
    let (url, _) = server(|mut stream| async move {
        let _ = stream.write_all(HEAD.as_bytes()).await;
        let _ = stream.write_all(&chunk(OPEN.as_bytes())).await;
        loop {
            if stream.write_all(&chunk(b" ")).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let deadline = Duration::from_millis(1500);
    let vsphere = SoapVsphere::new(SoapOptions {
        request_timeout: deadline,
        max_retries: 0,
        ..options()
    });
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        vsphere.create_vm(&plain_http(&url)),
    )
    .await
    .expect("the trickling answer was cut off")
    .unwrap_err();
    let took = started.elapsed();
    match &err {
        VsphereError::Transport { message } => {
            assert!(message.contains("deadline"), "{message}");
            assert!(message.contains("1.5s"), "{message}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(err.is_unavailable());
    assert!(
        took >= deadline && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn proxy_errors_say_the_endpoint_is_unavailable() {
    for status in [
        "502 Bad Gateway",
        "503 Service Unavailable",
        "504 Gateway Timeout",
    ] {
        let (url, _) = server(move |mut stream| async move {
            let body = "<html>upstream unavailable</html>";
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        })
        .await;
        let vsphere = SoapVsphere::new(SoapOptions {
            max_retries: 0,
            ..options()
        });
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            vsphere.create_vm(&plain_http(&url)),
        )
        .await
        .expect("the proxy answered")
        .unwrap_err();
        assert!(
            matches!(&err, VsphereError::Transport { message } if message.contains(&status[..3])),
            "{status}: {err:?}"
        );
    }
}

/// The figure `README.md` documents: with the default options, one
/// `create_vm` against an endpoint that refuses every connection sends
/// `max_retries + 1` requests (the first call, retried), then fails with a
/// transport error the runner parks on.
#[tokio::test]
async fn create_vm_against_a_refusing_endpoint_sends_the_documented_number_of_requests() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let options = SoapOptions::default();
    let documented = u64::from(options.max_retries) + 1;
    assert_eq!(documented, 4, "README.md's retry table");
    let vsphere = SoapVsphere::new(options);
    let spec = plain_http(&format!("http://127.0.0.1:{port}/sdk"));
    let err = tokio::time::timeout(Duration::from_secs(60), vsphere.create_vm(&spec))
        .await
        .expect("create_vm against a refusing endpoint ended")
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(vsphere.request_count(), documented);
}

#[tokio::test(start_paused = true)]
async fn continuation_pages_are_capped_and_long_polls_get_their_own_deadline() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    let page = Step::ok(
        "RetrievePropertiesEx",
        concat!(
            r#"<returnval><token>more</token><objects><obj type="VirtualMachine">vm-1</obj>"#,
            r#"<propSet><name>name</name><val xsi:type="xsd:string">a</val></propSet></objects></returnval>"#
        ),
    );
    let Step::Answer(page) = page else {
        unreachable!()
    };
    // A server that hands out a continuation token on every page.
    script.push("RetrievePropertiesEx", Step::Answer(page.clone()));
    let continued = page.replace(
        "RetrievePropertiesExResponse",
        "ContinueRetrievePropertiesExResponse",
    );
    // Bounded itself, so that a client without a cap fails this test
    // instead of hanging it.
    let last = continued.replace("<token>more</token>", "");
    let served = std::sync::atomic::AtomicU32::new(0);
    script.fallback(move |call| match call.method {
        "ContinueRetrievePropertiesEx"
            if served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 1000 =>
        {
            Step::Answer(continued.clone())
        }
        "ContinueRetrievePropertiesEx" => Step::Answer(last.clone()),
        other => Step::Error(VsphereError::Protocol {
            message: format!("not scripted: {other}"),
        }),
    });
    script
        .push(
            "RetrieveServiceContent",
            Step::Answer(fixture("RetrieveServiceContent")),
        )
        .push("Login", Step::Answer(fixture("Login")));
    let options = SoapOptions {
        max_continuation_pages: 7,
        ..options()
    };
    let session = dvmm_vsphere::session::Session::over(
        Arc::new(script.clone()),
        &spec.endpoint,
        Arc::new(options.clone()),
    );
    let folder = dvmm_vsphere::types::MoRef::new("Folder", "group-v3");
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        dvmm_vsphere::methods::vm_names_below(&session, &folder, Some(1)),
    )
    .await
    .expect("paging ended");
    let err = match err {
        Err(e) => e,
        Ok(found) => panic!("paging was not capped: {} names", found.len()),
    };
    assert!(
        matches!(&err, VsphereError::Protocol { message } if message.contains("7 continuation pages")),
        "{err:?}"
    );
    assert_eq!(script.count("ContinueRetrievePropertiesEx"), 7);

    // The deadline of a long poll: its server-side wait plus the margin.
    script.push(
        "WaitForUpdatesEx",
        Step::Answer(fixture("WaitForUpdatesEx-timeout")),
    );
    let collector = dvmm_vsphere::types::MoRef::new("PropertyCollector", "pc-1");
    dvmm_vsphere::methods::wait_for_updates(&session, &collector, "", 40)
        .await
        .expect("an empty update");
    let sent = script.requests();
    let poll = sent
        .iter()
        .find(|r| r.method == "WaitForUpdatesEx")
        .unwrap();
    assert_eq!(
        poll.deadline,
        Duration::from_secs(40) + options.long_poll_margin
    );
    let find = sent
        .iter()
        .find(|r| r.method == "RetrievePropertiesEx")
        .unwrap();
    assert_eq!(find.deadline, options.request_timeout);
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_says_the_endpoint_is_unavailable() {
    // The server reads the request and hangs up: what a vCenter restarting
    // under the client looks like.
    let (url, connections) = server(|stream| async move { drop(stream) }).await;
    let vsphere = SoapVsphere::new(SoapOptions {
        max_retries: 2,
        retry_base_delay: Duration::from_millis(20),
        max_retry_delay: Duration::from_millis(40),
        ..options()
    });
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        vsphere.create_vm(&plain_http(&url)),
    )
    .await
    .expect("the closed connection was noticed")
    .unwrap_err();
    assert!(
        matches!(&err, VsphereError::Transport { message } if !message.contains("127.0.0.1")),
        "{err:?}"
    );
    assert_eq!(*connections.lock().unwrap(), 3, "one try and two retries");
}

#[tokio::test(start_paused = true)]
async fn inventory_learned_before_a_relogin_is_looked_up_again() {
    let script = ScriptedTransport::new();
    let spec = vm_spec(PASSWORD);
    let world = fake_vcenter(&script, &spec);
    let vsphere = client(&script, options());
    let lookups = || script.count("FindByInventoryPath");
    create(&vsphere, &spec).await.expect("first");
    let first = lookups();

    world.lock().unwrap().vm_exists = false;
    let before = lookups();
    create(&vsphere, &spec).await.expect("second, same login");
    let cached = lookups() - before;

    // The server forgot the session (it restarted): what the client learned
    // of its inventory may be gone with it.
    world.lock().unwrap().vm_exists = false;
    script.push("FindByInventoryPath", Step::fault("NotAuthenticated"));
    create(&vsphere, &spec).await.expect("third, logs in again");
    world.lock().unwrap().vm_exists = false;
    let before = lookups();
    create(&vsphere, &spec)
        .await
        .expect("fourth, after the re-login");
    let relearned = lookups() - before;

    assert_eq!(script.count("Login"), 2);
    assert!(cached < first, "the second provisioning used the cache");
    assert!(
        relearned > cached + 1,
        "after the re-login the inventory was resolved again ({relearned} lookups, {cached} with the cache)"
    );
}
