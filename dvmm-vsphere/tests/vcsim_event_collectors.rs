//! The customization wait's event collectors against vcsim.
//!
//! vcsim 0.24 takes its locks in opposite orders in `DestroyCollector` and
//! in every event post, so a collector destroyed while any event is posted
//! hangs the whole simulator (a goroutine dump shows `PostEvent` holding the
//! `EventManager` and waiting for the collector, `DestroyCollector` holding
//! the collector and waiting for the `EventManager`). A wait per VM that
//! created and destroyed its own collector stalled provisionings at 16 in
//! flight. These tests hold the client to one shared collector per session,
//! never destroyed, and to many provisionings in flight finishing in time.
//!
//! Needs vcsim (`VCSIM_BIN`, default `target/vcsim/bin/vcsim`); skips
//! without it (in `DVMM_SKIP_LOG`), unless `DVMM_REQUIRE_SERVICES=1`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Guest, Outcome, Vcsim, fast_options, observer, play_customizing_guest, spec, within};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_vsphere::SoapVsphere;
use dvmm_vsphere::options::SoapOptions;
use dvmm_vsphere::session::{Connector, HttpConnector, Session};
use dvmm_vsphere::soap::Response;
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::{BoxFuture, Call, Transport};
use dvmm_vsphere::types::PowerState;
use dvmm_vsphere::{guest_player, methods};

/// Records the vim25 method of every request a session sends.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn Transport>,
    methods: Arc<Mutex<Vec<&'static str>>>,
}

impl Transport for Recording {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        self.methods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call.method);
        self.inner.round_trip(call)
    }
}

fn recording_client(options: SoapOptions) -> (SoapVsphere, Arc<Mutex<Vec<&'static str>>>) {
    let methods = Arc::new(Mutex::new(Vec::new()));
    let log = methods.clone();
    let connector = move |url: &str, tls: &TlsPolicy, options: &SoapOptions| {
        let inner = HttpConnector.connect(url, tls, options)?;
        Ok(Arc::new(Recording {
            inner,
            methods: log.clone(),
        }) as Arc<dyn Transport>)
    };
    (SoapVsphere::with_connector(options, connector), methods)
}

fn count(methods: &Mutex<Vec<&'static str>>, method: &str) -> usize {
    methods
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|m| **m == method)
        .count()
}

/// Four customizing VMs on one session: one event collector serves them
/// all, and none is destroyed (nor resized, which takes the same locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_share_one_event_collector_and_never_destroy_it() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let (vsphere, methods) = recording_client(fast_options());
    let names: Vec<String> = (0..4).map(|i| format!("shared-{i}")).collect();
    let mut guests = Vec::new();
    for name in &names {
        guests.push(play_customizing_guest(
            own.clone(),
            format!("DC0/vm/acme/shared/{name}"),
            Guest {
                pre_ip: Some("198.18.9.1"),
                ip: "198.18.9.42",
                host_name: None,
                customizing: common::MIN_CUSTOMIZING,
                outcome: Outcome::Succeed,
            },
        ));
    }
    let results = within(
        Duration::from_secs(120),
        "four customizing provisionings",
        futures::future::join_all(names.iter().map(|name| {
            let spec = spec(endpoint.clone(), "acme/shared", name, "VM Network");
            let vsphere = vsphere.clone();
            async move { vsphere.create_vm(&spec).await }
        })),
    )
    .await;
    for guest in guests {
        within(Duration::from_secs(30), "the guest player", guest)
            .await
            .expect("guest player");
    }
    for result in results {
        let result = result.expect("create_vm");
        assert_eq!(
            result.ip_address,
            Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                198, 18, 9, 42
            )))
        );
    }
    assert_eq!(
        count(&methods, "CreateCollectorForEvents"),
        1,
        "one event collector for the session"
    );
    assert_eq!(
        count(&methods, "DestroyCollector"),
        0,
        "no DestroyCollector"
    );
    assert_eq!(
        count(&methods, "SetCollectorPageSize"),
        0,
        "no SetCollectorPageSize"
    );
}

/// Plays the guest of every VM below `folder` as the SOAP bench does: when
/// one powers on, posts `CustomizationSucceeded` about it, then reports
/// tools and an address (`10.1.x.y`, one per VM).
async fn play_bench_guests(session: Arc<Session>, folder_path: String) {
    let folder = loop {
        if let Some(f) = common::find(&session, &folder_path).await {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pc = methods::create_property_collector(&session)
        .await
        .expect("player collector");
    session
        .call("CreateFilter", false, Duration::ZERO, |_, env| {
            env.moref("_this", &pc.kind, &pc.value)
                .open("spec")
                .open("propSet")
                .text("type", "VirtualMachine")
                .text("pathSet", "runtime.powerState")
                .close("propSet")
                .open("objectSet")
                .moref("obj", &folder.kind, &folder.value)
                .text("skip", "true")
                .open_typed("selectSet", "TraversalSpec")
                .text("name", "children")
                .text("type", "Folder")
                .text("path", "childEntity")
                .text("skip", "false")
                .close("selectSet")
                .close("objectSet")
                .close("spec")
                .text("partialUpdates", "false");
        })
        .await
        .expect("player filter");
    let mut version = String::new();
    let mut served = std::collections::HashSet::new();
    // vcsim's long poll can miss a power-on (see
    // `dvmm_vsphere::guest_player`): read them all again after the first
    // answer and every so often.
    let mut resync_at: Option<tokio::time::Instant> = None;
    loop {
        let updates = methods::wait_for_updates(&session, &pc, &version, 1)
            .await
            .expect("player wait");
        if let Some(v) = updates.version {
            version = v;
        }
        let mut on: Vec<_> = updates
            .changes
            .into_iter()
            .filter(|c| {
                c.val.as_ref().and_then(|v| PowerState::parse(&v.text))
                    == Some(PowerState::PoweredOn)
            })
            .map(|c| c.obj)
            .collect();
        if resync_at.is_none_or(|at| at.elapsed() >= guest_player::RESYNC_EVERY) {
            on.extend(
                guest_player::powered_on_below(&session, &folder)
                    .await
                    .expect("player re-read"),
            );
            resync_at = Some(tokio::time::Instant::now());
        }
        for vm in on {
            if served.insert(vm.clone()) {
                let n = served.len();
                let ip = format!("10.1.{}.{}", n / 250, n % 250 + 1);
                let session = session.clone();
                tokio::spawn(async move {
                    common::post(&session, &vm, "vm", "CustomizationSucceeded", None).await;
                    common::set_guest(
                        &session,
                        &vm,
                        &[
                            ("toolsRunningStatus", "guestToolsRunning"),
                            ("ipAddress", &ip),
                        ],
                    )
                    .await;
                });
            }
        }
    }
}

/// Rounds of 48 provisionings, 16 in flight on one session, while a guest player
/// posts each VM's customization success and then its address from another
/// session, and vcsim posts its own task events: every one reaches Ready
/// with its address in time (each call's answer is bounded by the request
/// timeout, so a hung simulator fails it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_in_flight_beside_event_posts_all_get_ready() {
    use futures::StreamExt;
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let vsphere = SoapVsphere::new(SoapOptions {
        wait_max_seconds: 30,
        ..fast_options()
    });
    // Rounds on one client, as the bench's samples: the session's event
    // collector idles between them and serves the next.
    for round in 0..4 {
        let folder = format!("acme/many{round}");
        let player = tokio::spawn(play_bench_guests(own.clone(), format!("DC0/vm/{folder}")));
        let results: Vec<_> = within(
            Duration::from_secs(240),
            "48 provisionings, 16 in flight",
            futures::stream::iter(0..48)
                .map(|i| {
                    let spec = spec(
                        endpoint.clone(),
                        &folder,
                        &format!("many-{i}"),
                        "VM Network",
                    );
                    let vsphere = vsphere.clone();
                    async move { vsphere.create_vm(&spec).await }
                })
                .buffer_unordered(16)
                .collect(),
        )
        .await;
        player.abort();
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| match r {
                Err(e) => Some(e.to_string()),
                Ok(r) if r.ip_address.is_none() => Some(format!("{} without IP", r.vmware_vm_id)),
                Ok(_) => None,
            })
            .collect();
        assert!(
            failed.is_empty(),
            "round {round}: provisionings failed: {failed:?}"
        );
    }
}

/// A success learned while the guest poll is held starts the IP wait then:
/// a guest that reports no address is ready (IP pending) once the IP wait
/// has passed, not when the held poll's server-side wait (30 s here) ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_without_address_ends_after_the_ip_wait_not_the_long_poll() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let player = dvmm_vsphere::guest_player::play_customizations(own, "DC0/vm/acme/bare".into());
    let vsphere = SoapVsphere::new(SoapOptions {
        wait_max_seconds: 30,
        ..fast_options()
    });
    let mut spec = spec(endpoint.clone(), "acme/bare", "bare-1", "VM Network");
    spec.ip_wait_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let result = within(
        Duration::from_secs(60),
        "create_vm",
        vsphere.create_vm(&spec),
    )
    .await
    .expect("create_vm");
    player.abort();
    assert_eq!(result.ip_address, None);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "ready only after {:?}: the held poll outlived the IP wait",
        started.elapsed()
    );
}

/// The session's collector took a VM's success while no wait listened for
/// that VM (another VM's wait kept it polling), and vCenter's history no
/// longer returns it (vcsim's `QueryEvents` searches only its newest 1,000
/// events of every kind, which a busy simulator posts within a second or
/// two). The VM's wait, begun after, still learns the outcome: from what
/// the session's collector already took, not from a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_taken_before_the_wait_began_counts_when_history_has_lost_it() {
    use dvmm_vsphere::customization::wait_ready;
    use dvmm_vsphere::events::{HubMessage, vm_of};
    use futures::StreamExt;
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, player) = observer(&endpoint);
    let (_c, session) = observer(&endpoint);
    let late = common::find(&player, "DC0/vm/DC0_H0_VM0")
        .await
        .expect("DC0_H0_VM0");
    let busy = common::find(&player, "DC0/vm/DC0_H0_VM1")
        .await
        .expect("DC0_H0_VM1");
    common::set_guest(
        &player,
        &late,
        &[
            ("toolsRunningStatus", "guestToolsRunning"),
            ("ipAddress", "10.1.0.7"),
        ],
    )
    .await;
    // Another VM's wait keeps the session's collector polling.
    let mut listening = session.events().subscribe(&session, &busy);
    common::post(&player, &late, "DC0_H0_VM0", "CustomizationSucceeded", None).await;
    common::post(&player, &busy, "DC0_H0_VM1", "CustomizationSucceeded", None).await;
    // Pages come in order: once the later event is handed on, the page
    // with the earlier one has been taken.
    within(
        Duration::from_secs(30),
        "the session's collector to hand on the busy VM's event",
        async {
            loop {
                match listening.recv().await {
                    Some(HubMessage::Events(list))
                        if list.iter().any(|e| vm_of(e).as_ref() == Some(&busy)) =>
                    {
                        break;
                    }
                    Some(HubMessage::Failed(e)) => panic!("collector failed: {e}"),
                    None => panic!("hub gone"),
                    Some(_) => {}
                }
            }
        },
    )
    .await;
    // Other VMs' events push the success out of vcsim's history.
    within(
        Duration::from_secs(120),
        "1,000 other events posted",
        futures::stream::iter(0..1000)
            .map(|_| {
                let player = player.clone();
                let busy = busy.clone();
                async move {
                    methods::post_vm_event(&player, &busy, "DC0_H0_VM1", "VmPoweredOnEvent", None)
                        .await
                        .expect("PostEvent");
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>(),
    )
    .await;
    let history = methods::query_events(&player, &late, methods::CUSTOMIZATION_EVENT_TYPES, None)
        .await
        .expect("QueryEvents");
    assert!(
        history.is_empty(),
        "the history still holds the success, so this test shows nothing: {history:?}"
    );
    let ready = within(
        Duration::from_secs(60),
        "the late VM's wait",
        wait_ready(
            session.clone(),
            &late,
            None,
            Duration::from_secs(10),
            Duration::from_secs(5),
        ),
    )
    .await
    .expect("the success the collector took before the wait began");
    assert_eq!(ready.ip, Some(std::net::Ipv4Addr::new(10, 1, 0, 7)));
    drop(listening);
}

/// The guest players' re-read lists the VMs powered on now, below the
/// folder and its sub-folders, and leaves out one powered off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_players_re_read_lists_the_vms_powered_on_now() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, session) = observer(&endpoint);
    let folder = common::find(&session, "DC0/vm").await.expect("DC0/vm");
    let on = common::find(&session, "DC0/vm/DC0_H0_VM0")
        .await
        .expect("DC0_H0_VM0");
    let off = common::find(&session, "DC0/vm/DC0_H0_VM1")
        .await
        .expect("DC0_H0_VM1");
    let task = methods::power_off_vm(&session, &off)
        .await
        .expect("PowerOffVM_Task");
    within(
        Duration::from_secs(60),
        "the power-off task",
        dvmm_vsphere::wait::wait_for_task(
            &session,
            &task,
            "PowerOffVM_Task",
            Duration::from_secs(60),
        ),
    )
    .await
    .expect("powered off");
    let listed = within(
        Duration::from_secs(60),
        "the re-read",
        guest_player::powered_on_below(&session, &folder),
    )
    .await
    .expect("re-read");
    assert!(listed.contains(&on), "{on} is on: {listed:?}");
    assert!(!listed.contains(&off), "{off} is off: {listed:?}");
}
