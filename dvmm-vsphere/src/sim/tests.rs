//! Unit tests of the simulator through its public API and the port.

use std::net::IpAddr;
use std::time::Duration;

use dvmm_core::spec::{IP_TIMEOUT_WARNING, PowerState, VmName};
use dvmm_core::{VmId, VmResources, VmSpec, VmwareVmId, VsphereError, VspherePort};

use super::*;

fn id<T: std::str::FromStr>(n: u64) -> T
where
    T::Err: fmt::Debug,
{
    format!("00000000-0000-4000-8000-{n:012x}")
        .parse()
        .expect("valid uuid")
}

/// The spec of VM `web-<name>` with dvmm id `n`, for the default inventory.
fn spec(sim: &Simulator, name: &str, n: u64) -> VmSpec {
    let config = sim.tenant_config(id(1), "acme").expect("default inventory");
    let vm_name = VmName::new("web", name).expect("valid name");
    VmSpec::for_request(
        &config,
        id(100 + n),
        id(n),
        &vm_name,
        "web",
        VmResources {
            cpu: 2,
            memory_mib: 4096,
            disk_gib: 40,
        },
    )
}

fn endpoint() -> VcenterEndpoint {
    simulator_endpoint()
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().expect("valid ip"))
}

fn not_found(kind: &str, name: &str) -> VsphereError {
    VsphereError::NotFound {
        kind: kind.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn every_missing_inventory_object_is_not_found_with_its_kind() {
    let sim = Simulator::new(SimulatorConfig {
        inventory: Inventory::default().with_datacenter(
            SimDatacenter::new("DC1").with_cluster_and_pools("C1", ["tenants/acme"]),
        ),
        ..SimulatorConfig::default()
    });
    let base = spec(&sim, "app01", 1);
    type Edit = Box<dyn Fn(&mut VmSpec)>;
    let cases: Vec<(Edit, VsphereError)> = vec![
        (
            Box::new(|s| s.datacenter = "DC9".into()),
            not_found("datacenter", "DC9"),
        ),
        (
            Box::new(|s| s.cluster = "C9".into()),
            not_found("cluster", "C9"),
        ),
        (
            Box::new(|s| s.resource_pool = Some("tenants/other".into())),
            not_found("resource pool", "tenants/other"),
        ),
        (
            Box::new(|s| s.datastore = "DS9".into()),
            not_found("datastore", "DS9"),
        ),
        (
            Box::new(|s| s.network = "Net9".into()),
            not_found("network", "Net9"),
        ),
        (
            Box::new(|s| s.template = "centos-5".into()),
            not_found("template", "centos-5"),
        ),
        // Objects of another datacenter do not count.
        (
            Box::new(|s| s.cluster = "C1".into()),
            not_found("cluster", "C1"),
        ),
    ];
    for (edit, expected) in cases {
        let mut spec = base.clone();
        edit(&mut spec);
        assert_eq!(sim.create_vm(&spec).await.unwrap_err(), expected);
    }
    assert!(sim.vms().is_empty(), "nothing was created");
    assert!(sim.folders("DC0").is_empty(), "no folder either");
    assert_eq!(sim.call_count(Operation::CreateVm), 7);
}

#[tokio::test]
async fn clone_follows_spec_and_inventory() {
    let sim = Simulator::default();
    let mut spec = spec(&sim, "app01", 1);
    spec.network = DEFAULT_DISTRIBUTED_NETWORK.into();
    let result = sim.create_vm(&spec).await.unwrap();
    assert_eq!(
        result,
        VmProvisioningResult {
            vmware_vm_id: VmwareVmId::new("vm-1000"),
            ip_address: ip("10.0.0.100"),
            hostname: "web-app01".into(),
            warning_message: None,
        }
    );
    assert_eq!(
        sim.vms(),
        [SimVm {
            vmware_vm_id: VmwareVmId::new("vm-1000"),
            name: "web-app01".into(),
            folder_path: "acme/web".into(),
            datacenter: "DC0".into(),
            dvmm_vm_id: Some(id(1)),
            resources: spec.resources,
            network: "DC0_DVPG0".into(),
            power_state: PowerState::PoweredOn,
            ip_address: ip("10.0.0.100"),
            hostname: Some("web-app01".into()),
            template: "ubuntu-22.04-template".into(),
            datastore: "LocalDS_0".into(),
        }]
    );
    assert_eq!(sim.folders("DC0"), ["acme/web"]);
    let info = sim.get_vm(&endpoint(), &result.vmware_vm_id).await.unwrap();
    assert_eq!(
        info,
        VmGuestInfo {
            vmware_vm_id: result.vmware_vm_id.clone(),
            name: "web-app01".into(),
            dvmm_vm_id: Some(id(1)),
            power_state: PowerState::PoweredOn,
            tools_running: true,
            ip_address: ip("10.0.0.100"),
            hostname: Some("web-app01".into()),
        }
    );
    assert_eq!(sim.find_vm(&spec).await.unwrap(), Some(info));
}

#[tokio::test]
async fn disk_grows_but_never_shrinks() {
    let sim = Simulator::default();
    for (n, requested, expected) in [(1, 5, 10), (2, 10, 10), (3, 11, 11), (4, 200, 200)] {
        let mut spec = spec(&sim, &format!("vm{n}"), n);
        spec.resources.disk_gib = requested;
        let result = sim.create_vm(&spec).await.unwrap();
        let vm = sim.vm(&result.vmware_vm_id).unwrap();
        assert_eq!(vm.resources.disk_gib, expected, "requested {requested}");
        assert_eq!(vm.resources.cpu, 2);
        assert_eq!(vm.resources.memory_mib, 4096);
    }
}

#[tokio::test]
async fn resource_pools_and_folder_paths_are_normalized() {
    let sim = Simulator::new(SimulatorConfig {
        inventory: Inventory::empty().with_datacenter(
            SimDatacenter::new("DC0")
                .with_cluster_and_pools("DC0_C0", ["tenants/acme"])
                .with_datastore("LocalDS_0", 100)
                .with_network("VM Network", NetworkKind::Standard)
                .with_template("t", DEFAULT_TEMPLATE_RESOURCES)
                .with_folder("/preexisting/"),
        ),
        ..SimulatorConfig::default()
    });
    assert_eq!(sim.folders("DC0"), ["preexisting"]);
    let mut first = spec(&sim, "app01", 1);
    first.resource_pool = Some("/tenants/acme/".into());
    first.folder_path = "/acme//web/".into();
    let created = sim.create_vm(&first).await.unwrap();
    let mut second = first.clone();
    second.resource_pool = Some(String::new());
    second.folder_path = "acme/web".into();
    let adopted = sim.create_vm(&second).await.unwrap();
    assert_eq!(adopted.vmware_vm_id, created.vmware_vm_id);
    assert_eq!(sim.vms().len(), 1);
    assert_eq!(sim.folders("DC0"), ["acme/web", "preexisting"]);
    assert!(sim.folders("nope").is_empty());
}

#[tokio::test]
async fn a_too_small_datastore_is_insufficient_resources() {
    let mut config = SimulatorConfig::default();
    config.inventory.datacenters[0].datastores[0].free_gib = 39;
    let sim = Simulator::new(config);
    let mut spec = spec(&sim, "app01", 1);
    let err = sim.create_vm(&spec).await.unwrap_err();
    assert!(
        matches!(&err, VsphereError::InsufficientResources { message }
            if message.contains("LocalDS_0") && message.contains("40 GiB")),
        "{err:?}"
    );
    // Thin clones do not use up the space: two small VMs fit one after another.
    spec.resources.disk_gib = 39;
    sim.create_vm(&spec).await.unwrap();
    let mut other = spec.clone();
    other.name = VmName::new("web", "app02").unwrap();
    other.vm_id = id(2);
    sim.create_vm(&other).await.unwrap();
    assert_eq!(sim.vms().len(), 2);
}

#[tokio::test]
async fn same_name_is_adopted_with_the_same_vm_id_and_refused_otherwise() {
    let sim = Simulator::default();
    let spec1 = spec(&sim, "app01", 1);
    let first = sim.create_vm(&spec1).await.unwrap();
    let again = sim.create_vm(&spec1).await.unwrap();
    assert_eq!(again, first, "adoption returns the same result");

    let mut thief = spec1.clone();
    thief.vm_id = id(2);
    assert_eq!(
        sim.create_vm(&thief).await.unwrap_err(),
        VsphereError::DuplicateName {
            name: "web-app01".into(),
            location: "acme/web".into()
        }
    );
    // The same name in another folder is another VM.
    let mut elsewhere = thief.clone();
    elsewhere.folder_path = "acme/db".into();
    let other = sim.create_vm(&elsewhere).await.unwrap();
    assert_ne!(other.vmware_vm_id, first.vmware_vm_id);
    assert_eq!(sim.vms().len(), 2);
}

#[tokio::test]
async fn a_foreign_vm_is_never_adopted() {
    let sim = Simulator::default();
    let foreign = sim.insert_foreign_vm("acme/web", "web-app01");
    assert_eq!(foreign.as_str(), "vm-1000");
    assert_eq!(sim.insert_foreign_vm("/acme/web", "web-app01"), foreign);
    let spec = spec(&sim, "app01", 1);
    assert!(matches!(
        sim.create_vm(&spec).await,
        Err(VsphereError::DuplicateName { .. })
    ));
    let found = sim.find_vm(&spec).await.unwrap().unwrap();
    assert_eq!(found.vmware_vm_id, foreign);
    assert_eq!(found.dvmm_vm_id, None);
    assert_eq!(found.power_state, PowerState::PoweredOn);
    assert!(!found.tools_running);
    assert_eq!(found.ip_address, None);
    let vms = sim.vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].dvmm_vm_id, None);
    assert_eq!(vms[0].datacenter, "DC0");

    // In an empty inventory the VM still lands somewhere predictable.
    let empty = Simulator::new(SimulatorConfig {
        inventory: Inventory::empty(),
        ..SimulatorConfig::default()
    });
    empty.insert_foreign_vm("x", "y");
    assert_eq!(empty.vms()[0].datacenter, DEFAULT_DATACENTER);
    assert_eq!(empty.vms()[0].template, "");
}

#[tokio::test]
async fn ips_come_from_the_pool_in_order_and_freed_ones_are_reused() {
    let sim = Simulator::new(SimulatorConfig {
        ip_pool: IpPool {
            start: "192.168.1.250".parse().unwrap(),
            size: 3,
        },
        ..SimulatorConfig::default()
    });
    let mut ids = Vec::new();
    for n in 1..=3 {
        let result = sim
            .create_vm(&spec(&sim, &format!("vm{n}"), n))
            .await
            .unwrap();
        ids.push(result.vmware_vm_id);
    }
    let ips: Vec<_> = sim.vms().into_iter().map(|vm| vm.ip_address).collect();
    assert_eq!(
        ips,
        [
            ip("192.168.1.250"),
            ip("192.168.1.251"),
            ip("192.168.1.252")
        ]
    );

    let exhausted = sim.create_vm(&spec(&sim, "vm4", 4)).await.unwrap_err();
    assert!(
        matches!(&exhausted, VsphereError::InsufficientResources { message } if message.contains("IP")),
        "{exhausted:?}"
    );
    assert_eq!(sim.vms().len(), 3, "nothing created on exhaustion");
    // Adoption needs no new address.
    assert_eq!(
        sim.create_vm(&spec(&sim, "vm2", 2))
            .await
            .unwrap()
            .ip_address,
        ip("192.168.1.251")
    );

    assert!(sim.remove_vm(&ids[1]));
    assert!(!sim.remove_vm(&ids[1]));
    let reused = sim.create_vm(&spec(&sim, "vm4", 4)).await.unwrap();
    assert_eq!(reused.ip_address, ip("192.168.1.251"));
    assert_eq!(
        reused.vmware_vm_id.as_str(),
        "vm-1003",
        "ids are never reused"
    );
    // The removed VM's name is free again: the clone gets past the name
    // check (DuplicateName comes first) and only lacks an address.
    let err = sim.create_vm(&spec(&sim, "vm2", 99)).await.unwrap_err();
    assert_eq!(err.code(), "InsufficientResources", "{err:?}");
}

#[tokio::test]
async fn get_vm_and_find_vm_report_unknown_vms() {
    let sim = Simulator::default();
    sim.create_vm(&spec(&sim, "app01", 1)).await.unwrap();
    for unknown in ["vm-999", "vm-1001", "vm-01000", "host-1000", "vm-"] {
        assert_eq!(
            sim.get_vm(&endpoint(), &VmwareVmId::new(unknown))
                .await
                .unwrap_err(),
            VsphereError::VmGone {
                vmware_vm_id: unknown.into()
            }
        );
    }
    assert_eq!(sim.find_vm(&spec(&sim, "app02", 2)).await.unwrap(), None);
    let mut lost = spec(&sim, "app01", 1);
    lost.datacenter = "DC9".into();
    assert_eq!(
        sim.find_vm(&lost).await.unwrap_err(),
        not_found("datacenter", "DC9")
    );
    assert_eq!(sim.call_count(Operation::GetVm), 5);
    assert_eq!(sim.call_count(Operation::FindVm), 2);
    assert_eq!(sim.call_count(Operation::CreateVm), 1);
}

#[tokio::test]
async fn every_fault_kind_on_create() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let denied = VsphereError::TaskFailed {
        fault: "NoPermission".into(),
        message: "denied".into(),
    };
    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::Error(denied.clone()),
    ));
    sim.add_fault(FaultRule::times(Operation::CreateVm, 1, Fault::Transient));
    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::DuplicateName,
    ));
    assert_eq!(sim.create_vm(&spec).await.unwrap_err(), denied);
    let transient = sim.create_vm(&spec).await.unwrap_err();
    assert!(transient.is_retryable(), "{transient:?}");
    assert_eq!(transient.code(), "Transport");
    assert_eq!(
        sim.create_vm(&spec).await.unwrap_err(),
        VsphereError::DuplicateName {
            name: "web-app01".into(),
            location: "acme/web".into()
        }
    );
    assert!(sim.vms().is_empty(), "failed calls change nothing");

    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::CreatedButCallFailed,
    ));
    let lost = sim.create_vm(&spec).await.unwrap_err();
    assert_eq!(lost.code(), "Transport");
    let vms = sim.vms();
    assert_eq!(vms.len(), 1, "the VM exists although the call failed");
    assert_eq!(vms[0].power_state, PowerState::PoweredOn);
    let retried = sim.create_vm(&spec).await.unwrap();
    assert_eq!(retried.vmware_vm_id, vms[0].vmware_vm_id);
    assert_eq!(sim.vms().len(), 1);
    assert_eq!(sim.call_count(Operation::CreateVm), 5);
}

#[tokio::test(start_paused = true)]
async fn delay_fault_slows_the_call_then_it_proceeds() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    sim.add_fault(FaultRule::times(
        Operation::CreateVm,
        1,
        Fault::Delay(Duration::from_secs(7)),
    ));
    sim.add_fault(FaultRule::times(
        Operation::GetVm,
        1,
        Fault::Delay(Duration::from_secs(3)),
    ));
    let start = Instant::now();
    let result = sim.create_vm(&spec).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(7));
    assert_eq!(result.ip_address, ip("10.0.0.100"));
    sim.get_vm(&endpoint(), &result.vmware_vm_id).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test]
async fn read_faults() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let vm = sim.create_vm(&spec).await.unwrap().vmware_vm_id;
    sim.add_fault(FaultRule::times(Operation::GetVm, 1, Fault::Transient));
    sim.add_fault(FaultRule::times(
        Operation::GetVm,
        1,
        Fault::CreatedButCallFailed,
    ));
    sim.add_fault(FaultRule::times(Operation::FindVm, 1, Fault::DuplicateName));
    sim.add_fault(FaultRule::times(
        Operation::FindVm,
        1,
        Fault::Error(VsphereError::NotAuthenticated),
    ));
    assert_eq!(
        sim.get_vm(&endpoint(), &vm).await.unwrap_err().code(),
        "Transport"
    );
    assert_eq!(
        sim.get_vm(&endpoint(), &vm).await.unwrap_err().code(),
        "Transport"
    );
    assert!(sim.get_vm(&endpoint(), &vm).await.is_ok());
    assert_eq!(
        sim.find_vm(&spec).await.unwrap_err(),
        VsphereError::DuplicateName {
            name: "web-app01".into(),
            location: "acme/web".into()
        }
    );
    assert_eq!(
        sim.find_vm(&spec).await.unwrap_err(),
        VsphereError::NotAuthenticated
    );
    assert!(sim.find_vm(&spec).await.unwrap().is_some());
}

#[tokio::test]
async fn triggers_always_nth_probability_and_clear() {
    let sim = Simulator::new(SimulatorConfig {
        seed: 42,
        ..SimulatorConfig::default()
    });
    let spec = spec(&sim, "app01", 1);
    sim.add_fault(FaultRule::new(
        Operation::GetVm,
        Trigger::Nth(2),
        Fault::Transient,
    ));
    let vm = sim.create_vm(&spec).await.unwrap().vmware_vm_id;
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(sim.get_vm(&endpoint(), &vm).await.is_ok());
    }
    assert_eq!(outcomes, [true, false, true, true]);

    sim.add_fault(FaultRule::always(Operation::FindVm, Fault::Transient));
    for _ in 0..3 {
        assert!(sim.find_vm(&spec).await.is_err());
    }
    sim.clear_faults();
    assert!(sim.find_vm(&spec).await.is_ok());

    let pattern = |seed| async move {
        let sim = Simulator::new(SimulatorConfig {
            seed,
            ..SimulatorConfig::default()
        });
        sim.add_fault(FaultRule::new(
            Operation::FindVm,
            Trigger::Probability(0.5),
            Fault::Transient,
        ));
        let spec = self::spec(&sim, "app01", 1);
        let mut hits = Vec::new();
        for _ in 0..64 {
            hits.push(sim.find_vm(&spec).await.is_err());
        }
        hits
    };
    let a = pattern(42).await;
    assert_eq!(a, pattern(42).await, "seeded: reproducible");
    assert_ne!(a, pattern(43).await);
    let failures = a.iter().filter(|hit| **hit).count();
    assert!((16..=48).contains(&failures), "{failures} of 64");
}

#[tokio::test(start_paused = true)]
async fn ip_arrives_after_ip_report_delay_or_times_out() {
    let delays = Delays {
        clone: Duration::from_secs(10),
        reconfigure: Duration::from_secs(2),
        customize: Duration::from_secs(3),
        power_on: Duration::from_secs(5),
        ip_report: Duration::from_secs(30),
    };
    let sim = Simulator::new(SimulatorConfig {
        delays,
        ..SimulatorConfig::default()
    });
    let mut spec1 = spec(&sim, "app01", 1);
    spec1.ip_wait_timeout = Duration::from_secs(30);
    let start = Instant::now();
    let result = sim.create_vm(&spec1).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(50));
    assert_eq!(result.ip_address, ip("10.0.0.100"));
    assert_eq!(result.warning_message, None);

    let mut spec2 = spec(&sim, "app02", 2);
    spec2.ip_wait_timeout = Duration::from_secs(29);
    let start = Instant::now();
    let result = sim.create_vm(&spec2).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(49));
    assert_eq!(result.ip_address, None);
    assert_eq!(result.warning_message.as_deref(), Some(IP_TIMEOUT_WARNING));
    // The guest reports it a second later: the refresh path sees it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = sim.get_vm(&endpoint(), &result.vmware_vm_id).await.unwrap();
    assert_eq!(info.ip_address, ip("10.0.0.101"));
}

#[tokio::test(start_paused = true)]
async fn set_guest_ip_wakes_a_waiting_create() {
    let sim = Simulator::new(SimulatorConfig {
        ip_mode: IpMode::Never,
        ..SimulatorConfig::default()
    });
    assert_eq!(sim.ip_mode(), IpMode::Never);
    let mut spec = spec(&sim, "app01", 1);
    spec.ip_wait_timeout = Duration::from_secs(120);
    let start = Instant::now();
    let waiting = tokio::spawn({
        let sim = sim.clone();
        let spec = spec.clone();
        async move { sim.create_vm(&spec).await }
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    let vm = sim.vms()[0].vmware_vm_id.clone();
    assert_eq!(sim.vms()[0].ip_address, None);
    sim.set_guest_ip(&vm, ip("172.16.0.9"));
    let result = waiting.await.unwrap().unwrap();
    assert_eq!(result.ip_address, ip("172.16.0.9"));
    assert_eq!(start.elapsed(), Duration::from_secs(20));
    let info = sim.get_vm(&endpoint(), &vm).await.unwrap();
    assert!(info.tools_running);
    assert_eq!(info.hostname.as_deref(), Some("web-app01"));

    sim.set_guest_ip(&vm, None);
    assert_eq!(sim.vm(&vm).unwrap().ip_address, None);
    sim.set_guest_ip(&vm, ip("fe80::1"));
    assert_eq!(sim.vm(&vm).unwrap().ip_address, None, "IPv4 only");
    // Unknown ids are ignored.
    sim.set_guest_ip(&VmwareVmId::new("vm-5"), ip("1.2.3.4"));
}

#[tokio::test(start_paused = true)]
async fn adoption_powers_on_a_stopped_vm() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            power_on: Duration::from_secs(4),
            ip_report: Duration::from_secs(6),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    let spec = spec(&sim, "app01", 1);
    let created = sim.create_vm(&spec).await.unwrap();
    let vm = created.vmware_vm_id.clone();
    assert!(sim.set_power_state(&vm, PowerState::PoweredOff));
    let info = sim.get_vm(&endpoint(), &vm).await.unwrap();
    assert_eq!(info.power_state, PowerState::PoweredOff);
    assert!(!info.tools_running);
    assert_eq!(info.ip_address, None);
    assert_eq!(info.hostname, None);

    let start = Instant::now();
    let adopted = sim.create_vm(&spec).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10), "power-on + boot");
    assert_eq!(adopted, created);
    assert_eq!(sim.vm(&vm).unwrap().power_state, PowerState::PoweredOn);

    assert!(sim.set_power_state(&vm, PowerState::Suspended));
    assert_eq!(sim.vm(&vm).unwrap().power_state, PowerState::Suspended);
    assert!(sim.set_power_state(&vm, PowerState::PoweredOn));
    assert!(sim.set_power_state(&vm, PowerState::PoweredOn));
    assert_eq!(sim.vm(&vm).unwrap().power_state, PowerState::PoweredOn);
    assert!(!sim.set_power_state(&VmwareVmId::new("vm-1"), PowerState::PoweredOn));
}

#[tokio::test(start_paused = true)]
async fn ip_mode_and_delays_apply_to_later_clones() {
    let sim = Simulator::default();
    sim.set_ip_mode(IpMode::Never);
    sim.set_delays(Delays {
        clone: Duration::from_secs(1),
        ..Delays::none()
    });
    let mut spec1 = spec(&sim, "app01", 1);
    spec1.ip_wait_timeout = Duration::from_secs(5);
    let start = Instant::now();
    let result = sim.create_vm(&spec1).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(result.ip_address, None);
    sim.set_ip_mode(IpMode::Report);
    sim.set_delays(Delays::none());
    let result = sim.create_vm(&spec(&sim, "app02", 2)).await.unwrap();
    assert_eq!(
        result.ip_address,
        ip("10.0.0.100"),
        "no address was used before"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(6));
}

#[test]
fn tenant_config_matches_the_inventory() {
    let sim = Simulator::default();
    let config = sim.tenant_config(id(1), "acme").unwrap();
    assert_eq!(
        (
            config.datacenter.as_str(),
            config.cluster.as_str(),
            config.datastore.as_str(),
            config.network.as_str(),
            config.template.as_str()
        ),
        (
            "DC0",
            "DC0_C0",
            "LocalDS_0",
            "VM Network",
            "ubuntu-22.04-template"
        )
    );
    assert_eq!(sim.tenant_config(id(1), "a/b").unwrap_err().field, "slug");
    let empty = Simulator::new(SimulatorConfig {
        inventory: Inventory::empty().with_datacenter(SimDatacenter::new("DC0").with_cluster("C")),
        ..SimulatorConfig::default()
    });
    assert_eq!(
        empty.tenant_config(id(1), "acme").unwrap_err().field,
        "inventory"
    );
}

#[test]
fn debug_is_a_summary_and_introspection_works_outside_a_runtime() {
    let sim = Simulator::default();
    sim.insert_foreign_vm("a", "b");
    let debug = format!("{sim:?}");
    assert!(debug.contains("vms: 1"), "{debug}");
    assert_eq!(sim.vms().len(), 1);
    assert_eq!(Operation::ALL.map(|op| sim.call_count(op)), [0; 6]);
    assert_eq!(Operation::CreateVm.to_string(), "create_vm");
    let _: VmId = id(1);
}

fn at_url(mut spec: VmSpec, url: &str) -> VmSpec {
    spec.endpoint.url = url.to_owned();
    spec
}

#[tokio::test]
async fn a_down_endpoint_refuses_every_call_and_other_endpoints_keep_working() {
    let sim = Simulator::default();
    let a = "https://vc-a.example.test/sdk";
    let b = "https://vc-b.example.test/sdk";
    sim.set_endpoint_down("HTTPS://VC-A.example.test:443/sdk/");
    let err = sim
        .create_vm(&at_url(spec(&sim, "app01", 1), a))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(sim.vms().is_empty(), "a refused call changes nothing");
    let mut down = endpoint();
    down.url = a.into();
    let err = sim
        .get_vm(&down, &VmwareVmId::new("vm-1000"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = sim
        .find_vm(&at_url(spec(&sim, "app01", 1), a))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(sim.unreachable_calls(), 3);
    assert_eq!(
        sim.call_count(Operation::CreateVm),
        1,
        "refused calls count"
    );

    let other = sim
        .create_vm(&at_url(spec(&sim, "app02", 2), b))
        .await
        .unwrap();
    assert_eq!(sim.vms().len(), 1, "{other:?}");

    sim.set_endpoint_up(a);
    sim.create_vm(&at_url(spec(&sim, "app01", 1), a))
        .await
        .unwrap();
    assert_eq!(sim.vms().len(), 2);
    assert_eq!(sim.unreachable_calls(), 3);
}

#[tokio::test]
async fn an_outage_of_n_calls_ends_by_itself() {
    let sim = Simulator::default();
    let url = "https://vc.example.test/sdk";
    sim.set_endpoint_down_for_calls(url, 2);
    for _ in 0..2 {
        let err = sim
            .create_vm(&at_url(spec(&sim, "app01", 1), url))
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
    sim.create_vm(&at_url(spec(&sim, "app01", 1), url))
        .await
        .unwrap();
    assert_eq!(sim.unreachable_calls(), 2);
    assert_eq!(sim.vms().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_outage_cuts_a_waiting_call_and_the_clone_is_adopted_afterwards() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(20),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    let url = "https://vc.example.test/sdk";
    let spec = at_url(spec(&sim, "app01", 1), url);
    let call = tokio::spawn({
        let (sim, spec) = (sim.clone(), spec.clone());
        async move { sim.create_vm(&spec).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sim.vms().len(), 1, "the clone started");
    sim.set_endpoint_down(url);
    let err = tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .expect("the waiting call ends when the endpoint goes down")
        .unwrap()
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    sim.set_endpoint_up(url);
    let result = sim.create_vm(&spec).await.unwrap();
    assert_eq!(sim.vms().len(), 1, "adopted, not cloned twice");
    assert_eq!(result.vmware_vm_id.as_str(), "vm-1000");
}

/// While the guest customizes it reports the template identity's address;
/// `create_vm` waits for the outcome and returns the address after the
/// reboot.
#[tokio::test(start_paused = true)]
async fn customization_takes_its_time_and_the_address_changes_after_it() {
    let sim = Simulator::new(SimulatorConfig {
        customization: GuestCustomization {
            duration: Duration::from_secs(30),
            pre_customization_ip: Some("198.18.9.1".parse().expect("ip")),
        },
        ..SimulatorConfig::default()
    });
    let spec = spec(&sim, "app01", 1);
    let start = Instant::now();
    let create = tokio::spawn({
        let sim = sim.clone();
        let spec = spec.clone();
        async move { sim.create_vm(&spec).await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let found = sim
        .find_vm(&spec)
        .await
        .expect("find_vm")
        .expect("the VM exists while customizing");
    assert_eq!(found.ip_address, ip("198.18.9.1"), "pre-customization IP");
    assert!(!create.is_finished(), "ready before customization finished");
    let result = tokio::time::timeout(Duration::from_secs(120), create)
        .await
        .expect("create_vm within 120 s of simulated time")
        .expect("task")
        .expect("create_vm");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(result.ip_address, ip("10.0.0.100"));
    assert_eq!(result.warning_message, None);
    let info = sim
        .get_vm(&endpoint(), &result.vmware_vm_id)
        .await
        .expect("get_vm");
    assert_eq!(info.ip_address, ip("10.0.0.100"));
}

/// A fault rule on `Customize` fails the provisioning with its error; one
/// that delays customization past the timeout is a customization timeout.
#[tokio::test(start_paused = true)]
async fn customization_failure_and_timeout_through_fault_rules() {
    let sim = Simulator::new(SimulatorConfig {
        customization: GuestCustomization {
            duration: Duration::from_secs(30),
            ..GuestCustomization::default()
        },
        ..SimulatorConfig::default()
    });
    let failed = VsphereError::CustomizationFailed {
        event: "CustomizationLinuxIdentityFailed".into(),
        reason: Some("perl is not installed".into()),
    };
    sim.add_fault(FaultRule::times(
        Operation::Customize,
        1,
        Fault::Error(failed.clone()),
    ));
    let err = sim.create_vm(&spec(&sim, "app01", 1)).await.unwrap_err();
    assert_eq!(err, failed);

    sim.add_fault(FaultRule::times(
        Operation::Customize,
        2,
        Fault::Delay(Duration::from_secs(3600)),
    ));
    let mut slow = spec(&sim, "app02", 2);
    slow.customization_timeout = Duration::from_secs(600);
    let start = Instant::now();
    let err = sim.create_vm(&slow).await.unwrap_err();
    assert_eq!(
        err,
        VsphereError::CustomizationTimeout {
            started: true,
            waited_secs: 600
        }
    );
    assert_eq!(start.elapsed(), Duration::from_secs(600));
    assert_eq!(sim.call_count(Operation::Customize), 2);
}

/// A zero customization timeout waits for no outcome: a failure rule on
/// `Customize` is never reached, and the VM is ready with its address.
#[tokio::test(start_paused = true)]
async fn zero_customization_timeout_waits_for_no_outcome() {
    let sim = Simulator::new(SimulatorConfig {
        customization: GuestCustomization {
            duration: Duration::from_secs(30),
            pre_customization_ip: Some("198.18.9.1".parse().expect("ip")),
        },
        ..SimulatorConfig::default()
    });
    sim.add_fault(FaultRule::times(
        Operation::Customize,
        1,
        Fault::Error(VsphereError::CustomizationFailed {
            event: "CustomizationLinuxIdentityFailed".into(),
            reason: None,
        }),
    ));
    let mut spec = spec(&sim, "app01", 1);
    spec.customization_timeout = Duration::ZERO;
    let result = tokio::time::timeout(Duration::from_secs(120), sim.create_vm(&spec))
        .await
        .expect("create_vm within 120 s of simulated time")
        .expect("create_vm");
    assert!(result.ip_address.is_some(), "{result:?}");
    assert_eq!(sim.call_count(Operation::Customize), 0);
}
