//! The customization wait on a scripted vCenter, in paused time: an outcome
//! the session's event collector never hands on (its answer lost on the
//! way, say) is still found in the VM's history before the wait gives up,
//! and a success known when the customization deadline passes is no
//! timeout.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::VsphereError;
use dvmm_vsphere::customization::{Ready, wait_ready};
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::scripted::{ScriptedTransport, Step};
use dvmm_vsphere::transport::{Call, Transport};
use dvmm_vsphere::types::MoRef;
use dvmm_vsphere::{SoapOptions, SoapVsphere};

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

fn moref(method: &str, kind: &str, value: &str) -> Step {
    Step::ok(
        method,
        &format!(r#"<returnval type="{kind}">{value}</returnval>"#),
    )
}

const VM: &str = "vm-63";

/// A change to `vm-63`'s guest properties, as `WaitForUpdatesEx` returns it.
fn guest_change(props: &[(&str, &str)]) -> Step {
    let mut changes = String::new();
    for (name, val) in props {
        changes.push_str(&format!(
            r#"<changeSet><name>{name}</name><op>assign</op><val xsi:type="xsd:string">{val}</val></changeSet>"#
        ));
    }
    Step::ok(
        "WaitForUpdatesEx",
        &format!(
            concat!(
                r#"<returnval><version>{{version}}</version><filterSet><filter type="PropertyFilter">f-guest</filter>"#,
                r#"<objectSet><kind>modify</kind><obj type="VirtualMachine">{}</obj>{}</objectSet>"#,
                r#"</filterSet></returnval>"#
            ),
            VM, changes
        ),
    )
}

fn success_event(tag: &str) -> String {
    event(tag, "CustomizationSucceeded", 7)
}

fn event(tag: &str, kind: &str, key: u32) -> String {
    format!(
        concat!(
            r#"<{tag} xsi:type="{kind}"><key>{key}</key><chainId>{key}</chainId>"#,
            r#"<createdTime>2026-11-30T18:00:00Z</createdTime><userName></userName>"#,
            r#"<vm><name>web-01</name><vm type="VirtualMachine">{vm}</vm></vm>"#,
            r#"<fullFormattedMessage>customized</fullFormattedMessage></{tag}>"#
        ),
        tag = tag,
        kind = kind,
        key = key,
        vm = VM
    )
}

/// The session's collector's `latestPage`, holding the success.
fn page_with_success() -> Step {
    Step::ok(
        "WaitForUpdatesEx",
        &format!(
            concat!(
                r#"<returnval><version>2</version><filterSet><filter type="PropertyFilter">f-events</filter>"#,
                r#"<objectSet><kind>modify</kind><obj type="EventHistoryCollector">ehc-1</obj>"#,
                r#"<changeSet><name>latestPage</name><op>assign</op><val xsi:type="ArrayOfEvent">{}</val></changeSet>"#,
                r#"</objectSet></filterSet></returnval>"#
            ),
            success_event("Event")
        ),
    )
}

/// A long poll that ends with nothing changed, after `seconds`.
fn nothing_after(seconds: f64) -> Step {
    Step::Answer(fixture("WaitForUpdatesEx-timeout")).after(Duration::from_secs_f64(seconds))
}

/// How the scripted vCenter answers the waits.
struct Script {
    /// Answers to the guest collector's polls after its first (which
    /// reports tools running), in order; then nothing after each wait.
    guest: Vec<Step>,
    /// Answers to the session collector's polls after its first, in
    /// order; then nothing after each wait.
    events: Vec<Step>,
    /// `QueryEvents` answers with the success from this read on (1-based).
    history_from: usize,
    /// The history holds a `CustomizationStartedEvent` from the first read.
    started: bool,
}

#[derive(Debug, Default)]
struct World {
    collectors: u32,
    events_collector: Option<String>,
    guest_polls: usize,
    events_polls: usize,
    history_reads: usize,
}

fn scripted_vcenter(script: &ScriptedTransport, plan: Script) -> Arc<Mutex<World>> {
    let world = Arc::new(Mutex::new(World::default()));
    let state = world.clone();
    let plan = Mutex::new(plan);
    script.fallback(move |call: &Call| {
        let body = call.body.as_str();
        let mut world = state.lock().unwrap();
        let mut plan = plan.lock().unwrap();
        let this = between(body, "<_this type=\"PropertyCollector\">", "</_this>").unwrap_or("");
        let max_wait: f64 = between(body, "<maxWaitSeconds>", "</maxWaitSeconds>")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        match call.method {
            "RetrieveServiceContent" => Step::Answer(fixture("RetrieveServiceContent")),
            "Login" => Step::Answer(fixture("Login")),
            "Logout" => Step::Answer(fixture("Logout")),
            "CreatePropertyCollector" => {
                world.collectors += 1;
                moref(
                    "CreatePropertyCollector",
                    "PropertyCollector",
                    &format!("pc-{}", world.collectors),
                )
            }
            "CreateCollectorForEvents" => {
                moref("CreateCollectorForEvents", "EventHistoryCollector", "ehc-1")
            }
            "CreateFilter" => {
                if body.contains("EventHistoryCollector") {
                    world.events_collector = Some(this.to_owned());
                }
                Step::Answer(fixture("CreateFilter"))
            }
            "WaitForUpdatesEx" if world.events_collector.as_deref() == Some(this) => {
                world.events_polls += 1;
                if world.events_polls == 1 {
                    return Step::Answer(fixture("WaitForUpdatesEx-timeout"));
                }
                if plan.events.is_empty() {
                    nothing_after(max_wait)
                } else {
                    plan.events.remove(0)
                }
            }
            "WaitForUpdatesEx" => {
                world.guest_polls += 1;
                let version = world.guest_polls.to_string();
                let step = if world.guest_polls == 1 {
                    guest_change(&[("guest.toolsRunningStatus", "guestToolsRunning")])
                } else if plan.guest.is_empty() {
                    nothing_after(max_wait)
                } else {
                    plan.guest.remove(0)
                };
                match step {
                    Step::Answer(text) => Step::Answer(text.replace("{version}", &version)),
                    Step::After(delay, inner) => match *inner {
                        Step::Answer(text) => {
                            Step::Answer(text.replace("{version}", &version)).after(delay)
                        }
                        other => Step::After(delay, Box::new(other)),
                    },
                    other => other,
                }
            }
            "QueryEvents" => {
                world.history_reads += 1;
                let mut history = String::new();
                if plan.started {
                    history.push_str(&event("returnval", "CustomizationStartedEvent", 5));
                }
                if world.history_reads >= plan.history_from {
                    history.push_str(&success_event("returnval"));
                }
                Step::ok("QueryEvents", &history)
            }
            "CancelWaitForUpdates" => Step::ok("CancelWaitForUpdates", ""),
            "DestroyPropertyCollector" => Step::Answer(fixture("DestroyPropertyCollector")),
            other => Step::Error(VsphereError::Protocol {
                message: format!("the scripted vCenter does not know {other}"),
            }),
        }
    });
    world
}

fn endpoint() -> VcenterEndpoint {
    VcenterEndpoint {
        url: "https://vc.example.test/sdk".into(),
        username: "svc-dvmm".into(),
        password: Secret::new("Sup3r-Secret-pw!"),
        insecure: true,
        thumbprint: None,
        allow_plain_http: false,
    }
}

async fn wait(
    script: &ScriptedTransport,
    customization: Duration,
    ip_wait: Duration,
) -> Result<Ready, VsphereError> {
    let transport = script.clone();
    let vsphere = SoapVsphere::with_connector(
        SoapOptions::default(),
        move |_: &str,
              _: &TlsPolicy,
              _: &SoapOptions|
              -> Result<Arc<dyn Transport>, VsphereError> {
            Ok(Arc::new(transport.clone()))
        },
    );
    let session = vsphere.session_for(&endpoint()).expect("session");
    tokio::time::timeout(
        Duration::from_secs(3600),
        wait_ready(
            session,
            &MoRef::new("VirtualMachine", VM),
            None,
            customization,
            ip_wait,
        ),
    )
    .await
    .expect("the customization wait ended")
}

/// The session's collector never hands the success on (as when its long
/// poll's answer is lost and the server already took the change off the
/// collector), and the history holds it only after the wait's first read:
/// the wait reads the history once more at its deadline and is ready.
#[tokio::test(start_paused = true)]
async fn an_outcome_the_collector_missed_is_read_from_history_before_giving_up() {
    let script = ScriptedTransport::new();
    let world = scripted_vcenter(
        &script,
        Script {
            guest: vec![guest_change(&[("guest.ipAddress", "10.0.0.42")])],
            events: Vec::new(),
            history_from: 2,
            started: false,
        },
    );
    let ready = wait(&script, Duration::from_secs(600), Duration::from_secs(120))
        .await
        .expect("the outcome in the history");
    assert_eq!(ready.ip, Some(Ipv4Addr::new(10, 0, 0, 42)));
    let world = world.lock().unwrap();
    assert_eq!(
        world.history_reads, 2,
        "read at the start and once more at the deadline, not polled"
    );
}

/// No outcome anywhere: the wait still times out, after one more read of
/// the history.
#[tokio::test(start_paused = true)]
async fn without_an_outcome_the_wait_times_out_after_one_more_history_read() {
    let script = ScriptedTransport::new();
    let world = scripted_vcenter(
        &script,
        Script {
            guest: Vec::new(),
            events: Vec::new(),
            history_from: usize::MAX,
            started: false,
        },
    );
    let started = tokio::time::Instant::now();
    let outcome = wait(&script, Duration::from_secs(600), Duration::from_secs(120)).await;
    assert!(
        matches!(
            outcome,
            Err(VsphereError::CustomizationTimeout { started: false, .. })
        ),
        "{outcome:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(600));
    assert!(started.elapsed() < Duration::from_secs(610));
    assert_eq!(world.lock().unwrap().history_reads, 2);
}

/// The success comes 1 s before the customization deadline, while the
/// guest's long poll is held; the server answers that poll 2 s late (as a
/// loaded one does), with the guest's address: the address counts, within
/// the IP wait that began with the success, instead of a customization
/// timeout that forgot the success.
#[tokio::test(start_paused = true)]
async fn a_success_known_at_the_deadline_waits_for_the_address() {
    let script = ScriptedTransport::new();
    scripted_vcenter(
        &script,
        Script {
            guest: vec![
                guest_change(&[("guest.ipAddress", "10.0.0.42")])
                    .after(Duration::from_secs(60 + 2)),
            ],
            events: vec![page_with_success().after(Duration::from_secs(59))],
            history_from: usize::MAX,
            started: false,
        },
    );
    let ready = wait(&script, Duration::from_secs(60), Duration::from_secs(120))
        .await
        .expect("the success known before the deadline");
    assert_eq!(ready.ip, Some(Ipv4Addr::new(10, 0, 0, 42)));
}

/// A VM whose history holds the start (and no address yet: the guest's
/// first poll reports only tools running), whose guest then reports
/// `guest`, and whose success the session's collector hands on 1 s in.
fn started_then_success_after_1s(guest: Vec<Step>) -> ScriptedTransport {
    let script = ScriptedTransport::new();
    scripted_vcenter(
        &script,
        Script {
            guest,
            events: vec![page_with_success().after(Duration::from_secs(1))],
            history_from: usize::MAX,
            started: true,
        },
    );
    script
}

/// vCenter recorded the start before the guest reported any address; the
/// first address reported after that may be the template identity's (from
/// before customization's reboot), so a success learned while the guest
/// shows it does not make it the answer: the address reported after it is.
#[tokio::test(start_paused = true)]
async fn an_address_first_reported_after_the_start_waits_for_a_newer_one() {
    let script = ScriptedTransport::new();
    scripted_vcenter(
        &script,
        Script {
            guest: vec![
                guest_change(&[("guest.ipAddress", "10.0.0.1")]),
                guest_change(&[("guest.ipAddress", "10.0.0.42")]).after(Duration::from_secs(3)),
            ],
            events: vec![page_with_success().after(Duration::from_secs(1))],
            history_from: usize::MAX,
            started: true,
        },
    );
    let ready = wait(&script, Duration::from_secs(600), Duration::from_secs(120))
        .await
        .expect("ready");
    assert_eq!(ready.ip, Some(Ipv4Addr::new(10, 0, 0, 42)));
}

/// The same, when the guest reports nothing newer: the address it shows is
/// its own after all, and is taken once it has held for a while after the
/// success, not after the whole IP wait and not as "IP pending".
#[tokio::test(start_paused = true)]
async fn an_address_first_reported_after_the_start_is_taken_once_it_holds() {
    let script =
        started_then_success_after_1s(vec![guest_change(&[("guest.ipAddress", "10.0.0.1")])]);
    let started = tokio::time::Instant::now();
    let ready = wait(&script, Duration::from_secs(600), Duration::from_secs(120))
        .await
        .expect("ready");
    assert_eq!(ready.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert!(
        started.elapsed() < dvmm_vsphere::customization::SETTLE + Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The guest restarted (VMware Tools seen stopped after the start, as
/// customization's reboot does) before reporting its address: that address
/// is the one after customization, and counts as soon as the success is
/// known.
#[tokio::test(start_paused = true)]
async fn an_address_reported_after_the_guest_restarted_counts_at_once() {
    let script = started_then_success_after_1s(vec![
        guest_change(&[("guest.toolsRunningStatus", "guestToolsNotRunning")]),
        guest_change(&[
            ("guest.toolsRunningStatus", "guestToolsRunning"),
            ("guest.ipAddress", "10.0.0.42"),
        ]),
    ]);
    let started = tokio::time::Instant::now();
    let ready = wait(&script, Duration::from_secs(600), Duration::from_secs(120))
        .await
        .expect("ready");
    assert_eq!(ready.ip, Some(Ipv4Addr::new(10, 0, 0, 42)));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
