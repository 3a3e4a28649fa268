//! SOAP benchmarks: decode of a large RetrievePropertiesEx answer, encode of a
//! full CloneVM_Task request, and end-to-end provisionings/s against vcsim.
//!
//! The decode input is recorded at bench time from `vcsim -vm 500` (1,000
//! VMs) and cached under `target/bench-data/`; benches that need vcsim are
//! skipped with a message when it is missing. See the crate README.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Vcsim, fast_options};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dvmm_core::config::VcenterEndpoint;
use dvmm_core::ports::VspherePort;
use dvmm_vsphere::methods::{self, CloneSpec, ConfigSpec};
use dvmm_vsphere::session::Session;
use dvmm_vsphere::soap::{Envelope, Response, read_response};
use dvmm_vsphere::types::{
    MoRef, NetworkBacking, PowerState, VmProperties, object_contents, object_contents_owned,
};
use dvmm_vsphere::{SoapOptions, SoapVsphere, guest_player};
use futures::StreamExt;

fn bench_data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data")
}

/// The raw answer to "name, config.hardware, guest, runtime, summary of every
/// VM" from `vcsim -vm 500`, recorded once.
fn large_response(rt: &tokio::runtime::Runtime) -> Option<Vec<u8>> {
    let path = bench_data_dir().join("vcsim-vm500-RetrievePropertiesEx.xml");
    if let Ok(bytes) = std::fs::read(&path) {
        return Some(bytes);
    }
    let sim = Vcsim::start(&["-vm", "500", "-tls=false"])?;
    let url = sim.url.clone();
    // This plain client gets no TLS settings from the library (it speaks
    // plain HTTP), but reqwest still needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bytes = rt.block_on(async move {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .unwrap();
        let post = |body: String| {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.post(&url)
                    .header("Content-Type", "text/xml; charset=utf-8")
                    .header("SOAPAction", "urn:vim25/6.5")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
                    .to_vec()
            }
        };
        let mut login = Envelope::new("Login");
        login
            .moref("_this", "SessionManager", "SessionManager")
            .text("userName", "user")
            .text("password", "pass");
        post(login.finish()).await;
        let mut find = Envelope::new("FindByInventoryPath");
        find.moref("_this", "SearchIndex", "SearchIndex")
            .text("inventoryPath", "DC0/vm");
        let found = post(find.finish()).await;
        let Ok(Response::Ok(node)) = read_response(&found) else {
            panic!("no VM folder")
        };
        let folder = MoRef::from_node(node.child("returnval").unwrap()).unwrap();
        let mut env = Envelope::new("RetrievePropertiesEx");
        env.moref("_this", "PropertyCollector", "propertyCollector")
            .open("specSet")
            .open("propSet")
            .text("type", "VirtualMachine");
        for p in ["name", "config.hardware", "guest", "runtime", "summary"] {
            env.text("pathSet", p);
        }
        env.close("propSet")
            .open("objectSet")
            .moref("obj", &folder.kind, &folder.value)
            .text("skip", "true")
            .open_typed("selectSet", "TraversalSpec")
            .text("name", "tree")
            .text("type", "Folder")
            .text("path", "childEntity")
            .text("skip", "false")
            .open("selectSet")
            .text("name", "tree")
            .close("selectSet")
            .close("selectSet")
            .close("objectSet")
            .close("specSet")
            .open("options")
            .close("options");
        post(env.finish()).await
    });
    drop(sim);
    std::fs::create_dir_all(bench_data_dir()).ok()?;
    std::fs::write(&path, &bytes).ok()?;
    Some(bytes)
}

fn decode_all(bytes: &[u8]) -> usize {
    let Ok(Response::Ok(node)) = read_response(bytes) else {
        panic!("not a response")
    };
    object_contents_owned(node)
        .into_iter()
        .map(VmProperties::from_content_owned)
        .filter(|vm| vm.hardware.num_cpu.is_some() && vm.runtime.power_state.is_some())
        .count()
}

fn decode(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(bytes) = large_response(&rt) else {
        eprintln!("decode bench skipped: vcsim missing");
        return;
    };
    let vms = decode_all(&bytes);
    eprintln!("decode input: {} bytes, {vms} VMs", bytes.len());
    let mut group = c.benchmark_group("decode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("RetrievePropertiesEx_1000_vms", |b| {
        b.iter(|| decode_all(&bytes))
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/RetrievePropertiesEx-vm.xml"
    ))
    .unwrap();
    let Ok(Response::Ok(node)) = read_response(&fixture) else {
        panic!("fixture")
    };
    let vm = VmProperties::from_content(&object_contents(&node)[0]);
    let net = NetworkBacking::Distributed {
        switch_uuid: "fea97929-4b2d-5972-b146-930c6d0b4014".into(),
        portgroup_key: "dvportgroup-13".into(),
    };
    let spec = CloneSpec {
        datastore: MoRef::new("Datastore", "datastore-56"),
        pool: MoRef::new("ResourcePool", "resgroup-26"),
        config: ConfigSpec {
            num_cpus: Some(4),
            memory_mb: Some(8192),
            device_changes: vec![
                (
                    "edit",
                    vm.hardware
                        .first_disk()
                        .unwrap()
                        .with_capacity_kib(80 << 20),
                ),
                (
                    "edit",
                    vm.hardware.nics().next().unwrap().with_backing(&net),
                ),
            ],
            extra_config: vec![(
                "dvmm.vmId".into(),
                "0d3c1f8e-1b7a-4a53-9d7e-2c4b9f0a1e55".into(),
            )],
        },
    };
    let (template, folder) = (
        MoRef::new("VirtualMachine", "vm-63"),
        MoRef::new("Folder", "folder-68"),
    );
    let size = {
        let mut env = Envelope::new("CloneVM_Task");
        methods::write_clone(&mut env, &template, &folder, "web-app01", &spec);
        env.finish().len()
    };
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function("CloneVM_Task", |b| {
        b.iter(|| {
            let mut env = Envelope::new("CloneVM_Task");
            methods::write_clone(&mut env, &template, &folder, "web-app01", &spec);
            env.finish()
        })
    });
    group.finish();
}

/// Plays the guest of every VM in `folder`: one private collector watches the
/// power state of the folder's VMs; each VM that powers on gets VMware Tools
/// and an IP through vcsim's `SET.guest.*` keys.
async fn guest_player(
    session: Arc<Session>,
    folder_path: String,
    stop: Arc<AtomicU64>,
    posted: Posted,
) {
    let folder = loop {
        if let Some(f) = common::find(&session, &folder_path).await {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let pc = methods::create_property_collector(&session).await.unwrap();
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
        .unwrap();
    let mut version = String::new();
    let mut served = std::collections::HashSet::new();
    let mut n = 0u32;
    // vcsim's long poll can miss a power-on: read every VM's power state
    // again after the first answer and every so often (see
    // `dvmm_vsphere::guest_player`).
    let mut resync_at: Option<Instant> = None;
    while stop.load(Ordering::Relaxed) == 0 {
        // A slow answer on a loaded machine must not end the guests: every
        // VM still waiting would then time out its customization.
        let updates = match methods::wait_for_updates(&session, &pc, &version, 1).await {
            Ok(updates) => updates,
            Err(e) => {
                posted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .wait_errors
                    .push(e.to_string());
                continue;
            }
        };
        if let Some(v) = updates.version {
            version = v;
        }
        let mut on: Vec<(MoRef, bool)> = updates
            .changes
            .into_iter()
            .filter(|c| {
                c.val.as_ref().and_then(|v| PowerState::parse(&v.text))
                    == Some(PowerState::PoweredOn)
            })
            .map(|c| (c.obj, false))
            .collect();
        if resync_at.is_none_or(|at| at.elapsed() >= guest_player::RESYNC_EVERY) {
            match guest_player::powered_on_below(&session, &folder).await {
                Ok(vms) => on.extend(vms.into_iter().map(|vm| (vm, true))),
                Err(e) => posted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .wait_errors
                    .push(format!("re-read: {e}")),
            }
            resync_at = Some(Instant::now());
        }
        {
            // Evidence of what the long poll misses.
            let mut played = posted.lock().unwrap_or_else(|e| e.into_inner());
            for (vm, by_reread) in &on {
                if *by_reread {
                    played.by_reread.insert(vm.clone());
                } else {
                    played.by_poll.insert(vm.clone());
                }
            }
        }
        for (vm, _) in on {
            if served.insert(vm.clone()) {
                n += 1;
                let ip = format!("10.1.{}.{}", n / 250, n % 250 + 1);
                let session = session.clone();
                let posted = posted.clone();
                tokio::spawn(async move {
                    let set = ConfigSpec {
                        extra_config: vec![
                            (
                                "SET.guest.toolsRunningStatus".into(),
                                "guestToolsRunning".into(),
                            ),
                            ("SET.guest.ipAddress".into(), ip),
                        ],
                        ..ConfigSpec::default()
                    };
                    // A guest whose customization is over when tools
                    // report its address (the bench measures the client,
                    // not a guest): the success first, then the address.
                    // Tried again after a failure (a second success is
                    // harmless), so one slow answer does not fail a VM.
                    let mut outcome = Err(String::from("not tried"));
                    for _ in 0..3 {
                        outcome = methods::post_vm_event(
                            &session,
                            &vm,
                            "bench-vm",
                            "CustomizationSucceeded",
                            None,
                        )
                        .await
                        .map(|()| Instant::now())
                        .map_err(|e| e.to_string());
                        if outcome.is_ok() {
                            break;
                        }
                    }
                    posted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .posted
                        .insert(vm.clone(), outcome);
                    for _ in 0..3 {
                        if methods::reconfig_vm(&session, &vm, &set).await.is_ok() {
                            break;
                        }
                    }
                });
            }
        }
    }
    let _ = methods::destroy_property_collector(&session, &pc).await;
}

/// What the bench's guest did: for each VM, when its success was posted or
/// why it could not be; and its long polls that failed.
#[derive(Default)]
struct Played {
    posted: std::collections::HashMap<MoRef, Result<Instant, String>>,
    wait_errors: Vec<String>,
    /// VMs the long poll reported powered on.
    by_poll: std::collections::HashSet<MoRef>,
    /// VMs a re-read found powered on.
    by_reread: std::collections::HashSet<MoRef>,
}

type Posted = Arc<std::sync::Mutex<Played>>;

/// Says, for a provisioning that failed, what the guest player did about its
/// VM and what vCenter's history holds about it now: tells a guest that
/// never posted from an outcome the client missed.
async fn diagnose(
    session: &Session,
    folder: &str,
    name: &str,
    posted: &Posted,
    error: &dvmm_core::ports::VsphereError,
) -> String {
    let Some(vm) = common::find(session, &format!("DC0/vm/{folder}/{name}")).await else {
        return format!("{name}: {error}; VM not found");
    };
    let (post, wait_errors) = {
        let played = posted.lock().unwrap_or_else(|e| e.into_inner());
        (played.posted.get(&vm).cloned(), played.wait_errors.clone())
    };
    let post = match post {
        None => "the guest player never saw it powered on".to_owned(),
        Some(Ok(at)) => format!("its success was posted {:?} ago", at.elapsed()),
        Some(Err(e)) => format!("posting its success failed: {e}"),
    };
    let history =
        match methods::query_events(session, &vm, methods::CUSTOMIZATION_EVENT_TYPES, None).await {
            Ok(events) => format!("{} customization events in its history now", events.len()),
            Err(e) => format!("history unreadable: {e}"),
        };
    format!("{name} ({vm}): {error}; {post}; {history}; the player's failed polls: {wait_errors:?}")
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(sim) = Vcsim::start(&[]) else {
        eprintln!("end-to-end bench skipped: vcsim missing");
        return;
    };
    let endpoint: VcenterEndpoint = sim.endpoint("user", "pass");
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("provision");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for concurrency in [1usize, 16, 32] {
        // One iteration is `concurrency` VMs, so every sample keeps the
        // requested number of provisionings in flight.
        group.throughput(Throughput::Elements(concurrency as u64));
        let vsphere = SoapVsphere::new(SoapOptions {
            wait_max_seconds: 30,
            ..fast_options()
        });
        let mut total_vms = 0u64;
        let requests_before = vsphere.request_count();
        group.bench_with_input(
            BenchmarkId::new("vcsim", concurrency),
            &concurrency,
            |b, &conc| {
                b.iter_custom(|iters| {
                    let run = counter.fetch_add(1, Ordering::Relaxed);
                    let folder = format!("bench/c{conc}r{run}");
                    let vms = iters * conc as u64;
                    total_vms += vms;
                    rt.block_on(async {
                        let (_observer, own) = common::observer(&endpoint);
                        let stop = Arc::new(AtomicU64::new(0));
                        let posted = Posted::default();
                        let player = tokio::spawn(guest_player(
                            own.clone(),
                            format!("DC0/vm/{folder}"),
                            stop.clone(),
                            posted.clone(),
                        ));
                        let started = Instant::now();
                        let results: Vec<_> = futures::stream::iter(0..vms)
                            .map(|i| {
                                let mut spec = common::spec(
                                    endpoint.clone(),
                                    &folder,
                                    &format!("vm-{i}"),
                                    "VM Network",
                                );
                                spec.ip_wait_timeout = Duration::from_secs(20);
                                let vsphere = vsphere.clone();
                                async move {
                                    let started = Instant::now();
                                    let result = vsphere.create_vm(&spec).await;
                                    (i, started, result)
                                }
                            })
                            .buffer_unordered(conc)
                            .collect()
                            .await;
                        let elapsed = started.elapsed();
                        stop.store(1, Ordering::Relaxed);
                        let _ = player.await;
                        let missed = {
                            let played = posted.lock().unwrap_or_else(|e| e.into_inner());
                            played.by_reread.difference(&played.by_poll).count()
                        };
                        if missed > 0 {
                            eprintln!(
                                "guest player: {missed} power-ons the long poll never reported (a re-read found them)"
                            );
                        }
                        let mut failed = Vec::new();
                        for (i, started, r) in results {
                            match r {
                                Ok(r) => {
                                    assert!(r.ip_address.is_some(), "guest IP");
                                    // A wait that ran long means something
                                    // was missed and found late: say what.
                                    let took = started.elapsed();
                                    if took > Duration::from_secs(5) {
                                        let vm = MoRef::new("VirtualMachine", r.vmware_vm_id.as_str());
                                        let posted_at = posted
                                            .lock()
                                            .unwrap_or_else(|e| e.into_inner())
                                            .posted
                                            .get(&vm)
                                            .cloned();
                                        eprintln!(
                                            "slow: vm-{i} ({vm}) took {took:?}; its success was posted {:?} after its start",
                                            posted_at.map(|p| p.map(|at| at.duration_since(started)))
                                        );
                                    }
                                }
                                Err(e) => failed.push(
                                    diagnose(&own, &folder, &format!("vm-{i}"), &posted, &e).await,
                                ),
                            }
                        }
                        assert!(failed.is_empty(), "provisionings failed: {failed:#?}");
                        elapsed
                    })
                })
            },
        );
        let per_vm = (vsphere.request_count() - requests_before) as f64 / total_vms.max(1) as f64;
        eprintln!(
            "provision/vcsim/{concurrency}: {total_vms} VMs, {per_vm:.1} SOAP requests per VM (one session, incl. login and inventory lookups)"
        );
    }
    group.finish();
}

criterion_group!(benches, decode, encode, end_to_end);
criterion_main!(benches);
