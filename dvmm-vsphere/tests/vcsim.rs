//! The SOAP adapter against govmomi's vcsim, one simulator per test.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{
    CALL_DEADLINE, Guest, Outcome, Vcsim, fast_options, find, observer, play_customizing_guest,
    play_guest, read, spec, within,
};
use dvmm_core::ports::{ProvisioningProgress, VsphereError, VspherePort};
use dvmm_core::spec::{IP_TIMEOUT_WARNING, hostname_mismatch_warning};
use dvmm_vsphere::SoapVsphere;
use dvmm_vsphere::methods;
use dvmm_vsphere::types::{MoRef, PowerState};

/// A guest that customizes at once and never reports an address.
fn no_ip() -> Guest {
    Guest {
        ip: "",
        ..Guest::default()
    }
}

fn kib(gib: u64) -> u64 {
    gib * 1024 * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_a_vm_on_a_standard_port_group_end_to_end() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let spec = spec(endpoint.clone(), "acme/web", "web-app01", "VM Network");
    let (_observer, own) = observer(&endpoint);
    let guest = play_guest(own.clone(), "DC0/vm/acme/web/web-app01".into(), "10.0.0.42");

    let vsphere = SoapVsphere::new(fast_options());
    let result = within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec))
        .await
        .expect("create_vm");
    let vm = within(
        common::GUEST_DEADLINE + CALL_DEADLINE,
        "the guest player",
        guest,
    )
    .await
    .expect("guest player");

    assert_eq!(result.vmware_vm_id.as_str(), vm.value);
    assert_eq!(
        result.ip_address,
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 42)))
    );
    assert_eq!(result.hostname, "web-app01");
    assert_eq!(result.warning_message, None);

    // The test's own view of what was built.
    let props = read(
        &own,
        &vm,
        &[
            "name",
            "parent",
            "config.hardware",
            "runtime.powerState",
            "guest",
            "config.extraConfig",
        ],
    )
    .await;
    assert_eq!(props.name.as_deref(), Some("web-app01"));
    let folder = find(&own, "DC0/vm/acme/web")
        .await
        .expect("folder acme/web");
    assert_eq!(props.parent.as_ref(), Some(&folder));
    assert_eq!(props.hardware.num_cpu, Some(2));
    assert_eq!(props.hardware.memory_mb, Some(4096));
    let disk = props.hardware.first_disk().expect("a disk");
    assert_eq!(disk.capacity_kib(), Some(kib(40)));
    let nic = props.hardware.nics().next().expect("a NIC");
    let backing = nic.0.child("backing").expect("NIC backing");
    assert_eq!(
        backing.xsi_type.as_deref(),
        Some("VirtualEthernetCardNetworkBackingInfo")
    );
    assert_eq!(backing.child_text("deviceName"), Some("VM Network"));
    assert_eq!(props.runtime.power_state, Some(PowerState::PoweredOn));
    assert_eq!(props.guest.host_name.as_deref(), Some("web-app01"));
    assert_eq!(
        props.extra(dvmm_vsphere::VM_ID_KEY),
        Some(spec.vm_id.to_string().as_str())
    );

    // find_vm / get_vm see the same VM, and a rerun adopts it.
    let found = within(CALL_DEADLINE, "find_vm", vsphere.find_vm(&spec))
        .await
        .unwrap()
        .expect("find_vm");
    assert_eq!(found.vmware_vm_id, result.vmware_vm_id);
    assert_eq!(found.dvmm_vm_id, Some(spec.vm_id));
    assert_eq!(found.ip_address, result.ip_address);
    let again = within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec))
        .await
        .expect("idempotent rerun");
    assert_eq!(again.vmware_vm_id, result.vmware_vm_id);
    let info = within(
        CALL_DEADLINE,
        "get_vm",
        vsphere.get_vm(&endpoint, &result.vmware_vm_id),
    )
    .await
    .unwrap();
    assert!(info.tools_running);
    assert_eq!(info.name, "web-app01");

    // shutdown() logs the client's session out: only the observer's is left.
    let sessions = || async {
        let sm = within(CALL_DEADLINE, "content", own.content())
            .await
            .unwrap()
            .session_manager;
        let contents = within(
            CALL_DEADLINE,
            "the session list",
            methods::retrieve_properties(
                &own,
                "SessionManager",
                &["sessionList"],
                std::slice::from_ref(&sm),
            ),
        )
        .await
        .unwrap();
        contents[0]
            .prop("sessionList")
            .map_or(0, |l| l.children.len())
    };
    assert_eq!(sessions().await, 2);
    within(CALL_DEADLINE, "shutdown", vsphere.shutdown()).await;
    assert_eq!(sessions().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_port_group_gets_a_dvport_backing_and_ip_timeout_warns() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let mut spec = spec(endpoint.clone(), "acme/db", "db-main", "DC0_DVPG0");
    spec.ip_wait_timeout = Duration::from_millis(700);
    let (_player, own) = observer(&endpoint);
    // Customizes, but never reports an address.
    let _guest = play_customizing_guest(own, "DC0/vm/acme/db/db-main".into(), no_ip());
    let vsphere = SoapVsphere::new(fast_options());
    let started = std::time::Instant::now();
    let result = within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec))
        .await
        .expect("create_vm");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(result.ip_address, None);
    assert_eq!(result.warning_message.as_deref(), Some(IP_TIMEOUT_WARNING));

    let (_o, own) = observer(&endpoint);
    let vm = MoRef::new("VirtualMachine", result.vmware_vm_id.as_str());
    let props = read(&own, &vm, &["config.hardware", "runtime.powerState"]).await;
    let backing = props
        .hardware
        .nics()
        .next()
        .unwrap()
        .0
        .child("backing")
        .cloned()
        .unwrap();
    assert_eq!(
        backing.xsi_type.as_deref(),
        Some("VirtualEthernetCardDistributedVirtualPortBackingInfo")
    );
    assert!(
        backing
            .path("port.portgroupKey")
            .is_some_and(|k| k.text.starts_with("dvportgroup-"))
    );
    assert_eq!(props.runtime.power_state, Some(PowerState::PoweredOn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_invalid_login() {
    let Some(sim) = Vcsim::start(&["-username", "alice", "-password", "right"]) else {
        return;
    };
    let vsphere = SoapVsphere::new(fast_options());
    let spec = spec(
        sim.endpoint("alice", "wrong"),
        "acme/web",
        "web-x",
        "VM Network",
    );
    let err = within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        VsphereError::InvalidLogin {
            username: "alice".into()
        }
    );
    assert!(!err.is_retryable());
    assert!(!format!("{err} {err:?}").contains("wrong"));
    let ok = SoapVsphere::new(fast_options());
    let spec = common::spec(
        sim.endpoint("alice", "right"),
        "acme/web",
        "web-x",
        "VM Network",
    );
    assert!(
        within(CALL_DEADLINE, "find_vm", ok.find_vm(&spec))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inventory_is_named_in_not_found() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let vsphere = SoapVsphere::new(fast_options());
    let base = spec(sim.endpoint("u", "p"), "acme/web", "web-nf", "VM Network");
    type Edit = Box<dyn Fn(&mut dvmm_core::spec::VmSpec)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("datacenter", Box::new(|s| s.datacenter = "DC9".into())),
        ("cluster or host", Box::new(|s| s.cluster = "C9".into())),
        ("datastore", Box::new(|s| s.datastore = "DS9".into())),
        ("network", Box::new(|s| s.network = "NET9".into())),
        ("template", Box::new(|s| s.template = "tpl9".into())),
    ];
    let missing = dvmm_core::ids::VmwareVmId::new("vm-99999");
    match within(
        CALL_DEADLINE,
        "get_vm",
        vsphere.get_vm(&base.endpoint, &missing),
    )
    .await
    {
        Err(VsphereError::VmGone { vmware_vm_id }) => assert_eq!(vmware_vm_id, "vm-99999"),
        other => panic!("get_vm of a missing VM: {other:?}"),
    }
    for (kind, edit) in cases {
        let mut s = base.clone();
        edit(&mut s);
        match within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&s)).await {
            Err(VsphereError::NotFound { kind: k, .. }) => assert_eq!(k, kind),
            other => panic!("{kind}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_logged_out_behind_the_clients_back_logs_in_again() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let vsphere = SoapVsphere::new(fast_options());
    let spec = spec(endpoint.clone(), "acme/web", "web-relog", "VM Network");
    assert!(
        within(CALL_DEADLINE, "find_vm", vsphere.find_vm(&spec))
            .await
            .unwrap()
            .is_none()
    );

    // The test's own session terminates every other session.
    let (_o, own) = observer(&endpoint);
    let before = vsphere.request_count();
    let terminated = terminate_other_sessions(&own).await;
    assert_eq!(terminated, 1, "the client's session was terminated");
    // RetrievePropertiesEx answers NotAuthenticated inside missingSet: the
    // client must notice and log in again transparently.
    let vm0 =
        dvmm_core::ids::VmwareVmId::new(find(&own, "DC0/vm/DC0_C0_RP0_VM0").await.unwrap().value);
    let info = within(CALL_DEADLINE, "get_vm", vsphere.get_vm(&endpoint, &vm0))
        .await
        .expect("get_vm after re-login");
    assert_eq!(info.name, "DC0_C0_RP0_VM0");
    assert!(
        vsphere.request_count() - before >= 4,
        "call, login pair, call again"
    );
    // A fault-form NotAuthenticated (FindByInventoryPath) also recovers.
    let before = vsphere.request_count();
    let terminated = terminate_other_sessions(&own).await;
    assert_eq!(terminated, 1, "the client's new session was terminated");
    assert!(
        within(CALL_DEADLINE, "find_vm", vsphere.find_vm(&spec))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        vsphere.request_count() - before >= 3,
        "call, login, call again"
    );
}

/// Terminates every session but `own`'s (as an administrator would behind
/// a client's back); returns how many it terminated.
async fn terminate_other_sessions(own: &dvmm_vsphere::session::Session) -> usize {
    let sm = within(CALL_DEADLINE, "ServiceContent", own.content())
        .await
        .unwrap()
        .session_manager;
    let contents = within(
        CALL_DEADLINE,
        "the session list",
        methods::retrieve_properties(
            own,
            "SessionManager",
            &["sessionList", "currentSession"],
            std::slice::from_ref(&sm),
        ),
    )
    .await
    .unwrap();
    let content = contents.first().unwrap();
    let mine = content
        .prop("currentSession")
        .and_then(|s| s.child_text("key"))
        .unwrap()
        .to_owned();
    let others: Vec<String> = content
        .prop("sessionList")
        .unwrap()
        .children
        .iter()
        .filter_map(|s| s.child_text("key"))
        .filter(|k| *k != mine)
        .map(str::to_owned)
        .collect();
    if !others.is_empty() {
        within(
            CALL_DEADLINE,
            "TerminateSession",
            own.call("TerminateSession", false, Duration::ZERO, |_, env| {
                env.moref("_this", &sm.kind, &sm.value);
                for key in &others {
                    env.text("sessionId", key);
                }
            }),
        )
        .await
        .expect("TerminateSession");
    }
    others.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_vm_with_the_same_name_is_a_duplicate() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let mut first = spec(endpoint.clone(), "acme/web", "web-dup", "VM Network");
    first.ip_wait_timeout = Duration::from_millis(300);
    let (_player, own) = observer(&endpoint);
    let _guest = play_customizing_guest(own, "DC0/vm/acme/web/web-dup".into(), no_ip());
    let vsphere = SoapVsphere::new(fast_options());
    within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&first))
        .await
        .expect("first VM");
    let mut foreign = first.clone();
    foreign.vm_id = dvmm_core::ids::VmId::from_uuid(uuid::Uuid::new_v4());
    match within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&foreign)).await {
        Err(VsphereError::DuplicateName { name, .. }) => assert_eq!(name, "web-dup"),
        other => panic!("{other:?}"),
    }
    let (_o, own) = observer(&endpoint);
    let folder = find(&own, "DC0/vm/acme/web").await.unwrap();
    let children = within(
        CALL_DEADLINE,
        "the folder's children",
        methods::retrieve_properties(&own, "Folder", &["childEntity"], &[folder]),
    )
    .await
    .unwrap();
    assert_eq!(
        children[0].prop("childEntity").unwrap().children.len(),
        1,
        "no second VM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_provisionings_race_for_a_new_folder_and_both_succeed() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let mut a = spec(endpoint.clone(), "race/proj", "proj-a", "VM Network");
    let mut b = spec(endpoint.clone(), "race/proj", "proj-b", "VM Network");
    a.ip_wait_timeout = Duration::from_millis(300);
    b.ip_wait_timeout = Duration::from_millis(300);
    let (_player, own) = observer(&endpoint);
    let _ga = play_customizing_guest(own.clone(), "DC0/vm/race/proj/proj-a".into(), no_ip());
    let _gb = play_customizing_guest(own, "DC0/vm/race/proj/proj-b".into(), no_ip());
    // Two clients: two sessions, no shared cache, a real race.
    let (va, vb) = (
        SoapVsphere::new(fast_options()),
        SoapVsphere::new(fast_options()),
    );
    let (ra, rb) = within(CALL_DEADLINE, "two racing create_vm calls", async {
        tokio::join!(va.create_vm(&a), vb.create_vm(&b))
    })
    .await;
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert_ne!(ra.vmware_vm_id, rb.vmware_vm_id);
    let (_o, own) = observer(&endpoint);
    let folder = find(&own, "DC0/vm/race/proj").await.unwrap();
    let children = within(
        CALL_DEADLINE,
        "the folder's children",
        methods::retrieve_properties(&own, "Folder", &["childEntity"], &[folder]),
    )
    .await
    .unwrap();
    assert_eq!(children[0].prop("childEntity").unwrap().children.len(), 2);

    // The audit listing sees both, below the tenant folder and below its parent.
    let mut names = within(
        CALL_DEADLINE,
        "list_vm_names",
        va.list_vm_names(&endpoint, "DC0", "race/proj"),
    )
    .await
    .unwrap();
    names.sort();
    assert_eq!(names, ["proj-a", "proj-b"]);
    let below_tenant = within(
        CALL_DEADLINE,
        "list_vm_names",
        va.list_vm_names(&endpoint, "DC0", "race"),
    )
    .await
    .unwrap();
    assert_eq!(below_tenant.len(), 2);
    assert!(
        within(
            CALL_DEADLINE,
            "list_vm_names",
            va.list_vm_names(&endpoint, "DC0", "race/nothing-here")
        )
        .await
        .unwrap()
        .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_follows_continuation_pages() {
    let Some(sim) = Vcsim::start(&["-vm", "150"]) else {
        return;
    };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let root = find(&own, "DC0/vm").await.unwrap();
    // Pages of 40: several continuations.
    let all = within(
        CALL_DEADLINE,
        "the paged listing",
        methods::vm_names_below(&own, &root, Some(40)),
    )
    .await
    .unwrap();
    let unique: std::collections::HashSet<_> = all.iter().map(|(r, _)| r.value.clone()).collect();
    assert_eq!(unique.len(), all.len(), "a page repeated an object");
    let client = SoapVsphere::new(fast_options());
    let listed = within(
        CALL_DEADLINE,
        "list_vm_names",
        client.list_vm_names(&endpoint, "DC0", ""),
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), all.len());
    assert!(listed.len() >= 150, "{} VMs listed", listed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcsim_killed_mid_provisioning_gives_transport_error_and_opens_the_breaker() {
    // The clone answers after 15 s, so the kill below (2 s after the
    // folder it clones into appears) lands while the clone call is open.
    let Some(mut sim) = Vcsim::start(&["-method-delay", "CloneVM_Task:15000"]) else {
        return;
    };
    let endpoint = sim.endpoint("user", "pass");
    let spec = spec(endpoint.clone(), "acme/web", "web-kill", "VM Network");
    let options = dvmm_vsphere::SoapOptions {
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_secs(60),
        ..fast_options()
    };
    let vsphere = SoapVsphere::new(options);
    let task = {
        let vsphere = vsphere.clone();
        let spec = spec.clone();
        tokio::spawn(
            async move { within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec)).await },
        )
    };
    let (_o, own) = observer(&endpoint);
    let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
    while find(&own, "DC0/vm/acme/web").await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "create_vm made no folder acme/web within {CALL_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!task.is_finished(), "create_vm ended before the kill");
    sim.kill();
    let err = within(CALL_DEADLINE, "create_vm to fail", task)
        .await
        .expect("no panic")
        .unwrap_err();
    assert!(matches!(err, VsphereError::Transport { .. }), "{err:?}");
    assert!(err.is_retryable());
    // Retries exhausted the threshold: the breaker now fails fast, without
    // sending anything.
    let sent = vsphere.request_count();
    let started = std::time::Instant::now();
    let err = within(CALL_DEADLINE, "find_vm", vsphere.find_vm(&spec))
        .await
        .unwrap_err();
    assert!(matches!(err, VsphereError::CircuitOpen { .. }), "{err:?}");
    assert_eq!(
        vsphere.request_count(),
        sent,
        "an open breaker sends nothing"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failing fast took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_wait_destroys_its_collector() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_c, session) = observer(&endpoint);
    let vm = find(&session, "DC0/vm/DC0_C0_RP0_VM0").await.unwrap();
    let mut wait = within(
        CALL_DEADLINE,
        "a property collector",
        dvmm_vsphere::wait::PropertyWait::open(session.clone(), vm, &["runtime.powerState"]),
    )
    .await
    .unwrap();
    let first = within(
        CALL_DEADLINE,
        "the first update",
        wait.next(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    assert_eq!(first[0].0, "runtime.powerState");
    let collector = wait.collector().cloned().unwrap();
    drop(wait);
    // The destroy runs in the background; the collector soon disappears.
    let limit = Duration::from_secs(20);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = within(
            CALL_DEADLINE,
            "WaitForUpdatesEx on the dropped collector",
            methods::wait_for_updates(&session, &collector, "", 1),
        )
        .await;
        if matches!(r, Err(VsphereError::NotFound { .. })) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector still exists {limit:?} after its wait was dropped: {r:?}"
        );
    }
}

/// The guest boots with the template's address, customization reboots it
/// into a new one and vCenter records the success 2 s later: the result has
/// the new address, never the first one, and the hostname the guest
/// reported is checked against the requested one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customization_success_reports_the_address_after_the_reboot() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let spec = spec(endpoint.clone(), "acme/web", "web-cust", "VM Network");
    let (_o, own) = observer(&endpoint);
    let customizing = Duration::from_secs(2);
    let guest = play_customizing_guest(
        own,
        "DC0/vm/acme/web/web-cust".into(),
        Guest {
            pre_ip: Some("198.18.9.1"),
            ip: "198.18.9.42",
            host_name: Some("template-host"),
            customizing,
            outcome: Outcome::Succeed,
        },
    );
    let vsphere = SoapVsphere::new(fast_options());
    let started = std::time::Instant::now();
    let reports = std::sync::Mutex::new(Vec::new());
    let report = |progress| reports.lock().unwrap().push(progress);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        vsphere.create_vm_reporting(&spec, &report),
    )
    .await
    .expect("create_vm within 60 s")
    .expect("create_vm");
    guest.await.expect("guest player");
    assert!(started.elapsed() >= customizing, "returned before success");
    assert_eq!(
        *reports.lock().unwrap(),
        [ProvisioningProgress::CustomizingGuest],
        "the wait for the customization outcome was reported"
    );
    assert_eq!(
        result.ip_address,
        Some(IpAddr::V4(Ipv4Addr::new(198, 18, 9, 42)))
    );
    assert_eq!(result.hostname, "web-cust");
    assert_eq!(
        result.warning_message,
        Some(hostname_mismatch_warning("web-cust", "template-host"))
    );
}

/// `CustomizationLinuxIdentityFailed` fails the provisioning with vCenter's
/// reason, as a typed error; a success recorded on the template does not
/// count for the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customization_failure_fails_with_the_reason() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let spec = spec(endpoint.clone(), "acme/web", "web-fail", "VM Network");
    let (_o, own) = observer(&endpoint);
    let template = find(&own, "DC0/vm/DC0_C0_RP0_VM0").await.expect("template");
    common::post(
        &own,
        &template,
        "DC0_C0_RP0_VM0",
        "CustomizationSucceeded",
        None,
    )
    .await;
    let _guest = play_customizing_guest(
        own,
        "DC0/vm/acme/web/web-fail".into(),
        Guest {
            pre_ip: Some("198.18.9.1"),
            outcome: Outcome::Fail("perl is not installed"),
            ..Guest::default()
        },
    );
    let vsphere = SoapVsphere::new(fast_options());
    let err = tokio::time::timeout(Duration::from_secs(60), vsphere.create_vm(&spec))
        .await
        .expect("create_vm within 60 s")
        .unwrap_err();
    match &err {
        VsphereError::CustomizationFailed { event, reason } => {
            assert_eq!(event, "CustomizationLinuxIdentityFailed");
            assert_eq!(reason.as_deref(), Some("perl is not installed"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable() && !err.is_unavailable());
}

/// No outcome within the customization timeout: "never started" and
/// "started but never finished" are told apart; a success on the template
/// is not the clone's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customization_timeout_tells_never_started_from_unfinished() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let template = find(&own, "DC0/vm/DC0_C0_RP0_VM0").await.expect("template");
    common::post(
        &own,
        &template,
        "DC0_C0_RP0_VM0",
        "CustomizationSucceeded",
        None,
    )
    .await;
    let vsphere = SoapVsphere::new(fast_options());
    for (name, outcome, started) in [
        ("web-never", Outcome::NeverStart, false),
        ("web-hang", Outcome::Hang, true),
    ] {
        let mut spec = spec(endpoint.clone(), "acme/web", name, "VM Network");
        spec.customization_timeout = Duration::from_secs(2);
        let _guest = play_customizing_guest(
            own.clone(),
            format!("DC0/vm/acme/web/{name}"),
            Guest {
                pre_ip: Some("198.18.9.1"),
                outcome,
                ..Guest::default()
            },
        );
        let err = tokio::time::timeout(Duration::from_secs(60), vsphere.create_vm(&spec))
            .await
            .expect("create_vm within 60 s")
            .unwrap_err();
        match err {
            VsphereError::CustomizationTimeout {
                started: s,
                waited_secs,
            } => {
                assert_eq!(s, started, "{name}");
                assert!(waited_secs >= 2, "{name}: {waited_secs}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Plain vcsim records no customization events: a zero customization
/// timeout waits for none, so the VM is ready once powered on with tools
/// running and its first address (here the template identity's, since
/// nothing tells it apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_customization_timeout_needs_no_customization_events() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_o, own) = observer(&endpoint);
    let mut spec = spec(endpoint.clone(), "acme/web", "web-plain", "VM Network");
    spec.customization_timeout = Duration::ZERO;
    let guest = play_customizing_guest(
        own.clone(),
        "DC0/vm/acme/web/web-plain".into(),
        Guest {
            pre_ip: Some("198.18.9.1"),
            outcome: Outcome::NeverStart,
            ..Guest::default()
        },
    );
    let vsphere = SoapVsphere::new(fast_options());
    let reports = std::sync::Mutex::new(Vec::new());
    let report = |progress| reports.lock().unwrap().push(progress);
    let result = within(
        CALL_DEADLINE,
        "create_vm",
        vsphere.create_vm_reporting(&spec, &report),
    )
    .await
    .expect("create_vm");
    within(common::GUEST_DEADLINE, "the guest player", guest)
        .await
        .expect("guest player");
    assert_eq!(
        result.ip_address,
        Some(IpAddr::V4(Ipv4Addr::new(198, 18, 9, 1)))
    );
    assert_eq!(result.warning_message, None);
    assert!(
        reports.lock().unwrap().is_empty(),
        "no customization wait, so none reported"
    );
    // And a guest that never reports an address: ready without one.
    let mut spec = spec.clone();
    spec.name = dvmm_core::spec::VmName::parse("web-bare").expect("name");
    spec.hostname = spec.name.clone();
    spec.vm_id = dvmm_core::ids::VmId::from_uuid(uuid::Uuid::new_v4());
    spec.ip_wait_timeout = Duration::from_secs(1);
    let result = within(CALL_DEADLINE, "create_vm", vsphere.create_vm(&spec))
        .await
        .expect("create_vm without guest");
    assert_eq!(result.ip_address, None);
    assert_eq!(result.warning_message.as_deref(), Some(IP_TIMEOUT_WARNING));
}

/// A provisioning that stopped waiting (here: its customization timeout ran
/// out, as a crash would) is resumed after the guest's success was posted:
/// the adopted, running VM's history has the outcome, and the address is
/// the one after customization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_success_event_finds_it_in_the_history() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let mut spec = spec(endpoint.clone(), "acme/web", "web-resume", "VM Network");
    spec.customization_timeout = Duration::from_secs(1);
    let (_o, own) = observer(&endpoint);
    let guest = play_customizing_guest(
        own.clone(),
        "DC0/vm/acme/web/web-resume".into(),
        Guest {
            pre_ip: Some("198.18.9.1"),
            ip: "198.18.9.42",
            customizing: Duration::from_secs(2),
            outcome: Outcome::Succeed,
            ..Guest::default()
        },
    );
    let vsphere = SoapVsphere::new(fast_options());
    let first = tokio::time::timeout(Duration::from_secs(60), vsphere.create_vm(&spec))
        .await
        .expect("first create_vm within 60 s");
    assert!(
        matches!(
            first,
            Err(VsphereError::CustomizationTimeout { started: true, .. })
        ),
        "{first:?}"
    );
    let vm = tokio::time::timeout(Duration::from_secs(30), guest)
        .await
        .expect("the guest finished customizing within 30 s")
        .expect("guest player");
    let resumed = tokio::time::timeout(Duration::from_secs(60), vsphere.create_vm(&spec))
        .await
        .expect("resumed create_vm within 60 s")
        .expect("resumed create_vm");
    assert_eq!(resumed.vmware_vm_id.as_str(), vm.value);
    assert_eq!(
        resumed.ip_address,
        Some(IpAddr::V4(Ipv4Addr::new(198, 18, 9, 42)))
    );
    assert_eq!(resumed.warning_message, None);
}
