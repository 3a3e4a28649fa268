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
use dvmm_vsphere::session::{Connector, HttpConnector};
use dvmm_vsphere::soap::Response;
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::{BoxFuture, Call, Transport};

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
                customizing: Duration::from_secs(1),
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

/// 48 provisionings, 16 in flight on one session, while a guest player
/// posts each VM's customization from another session and vcsim posts its
/// own task events: every one reaches Ready in time (each call's answer is
/// bounded by the request timeout, so a hung simulator fails it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_in_flight_beside_event_posts_all_get_ready() {
    use futures::StreamExt;
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let player = dvmm_vsphere::guest_player::play_customizations(own, "DC0/vm/acme/many".into());
    let vsphere = SoapVsphere::new(fast_options());
    let results: Vec<_> = within(
        Duration::from_secs(240),
        "48 provisionings, 16 in flight",
        futures::stream::iter(0..48)
            .map(|i| {
                let mut spec = spec(
                    endpoint.clone(),
                    "acme/many",
                    &format!("many-{i}"),
                    "VM Network",
                );
                // vcsim gives the VMs no address; the wait is for the
                // customization outcome.
                spec.ip_wait_timeout = Duration::from_secs(1);
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
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "provisionings failed: {failed:?}");
}
