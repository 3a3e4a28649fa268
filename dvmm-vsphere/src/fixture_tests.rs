//! The reader, decoders and writer on responses recorded from vcsim 0.24
//! (`scripts/record-fixtures.sh`).

use dvmm_core::ports::VsphereError;

use crate::methods::{self, CloneSpec, ConfigSpec, decode_updates};
use crate::soap::{Envelope, Node, Response, parse_document, read_response};
use crate::types::{
    MoRef, NetworkBacking, ObjectContent, PowerState, ServiceContent, TaskInfo, TaskState,
    VmProperties, object_contents,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ok(name: &str) -> Node {
    match read_response(&fixture(name)).unwrap() {
        Response::Ok(node) => node,
        Response::Fault(f) => panic!("{name}: unexpected fault {f:?}"),
    }
}

fn fault(name: &str) -> VsphereError {
    match read_response(&fixture(name)).unwrap() {
        Response::Fault(f) => f.into_error("user"),
        Response::Ok(_) => panic!("{name}: expected a fault"),
    }
}

#[test]
fn service_content() {
    let node = ok("RetrieveServiceContent");
    let sc = ServiceContent::from_node(node.child("returnval").unwrap()).unwrap();
    assert_eq!(sc.root_folder, MoRef::new("Folder", "group-d1"));
    assert_eq!(
        sc.property_collector,
        MoRef::new("PropertyCollector", "propertyCollector")
    );
    assert_eq!(sc.search_index, MoRef::new("SearchIndex", "SearchIndex"));
    assert_eq!(
        sc.session_manager,
        MoRef::new("SessionManager", "SessionManager")
    );
    assert_eq!(sc.api_version, "6.5");
}

#[test]
fn faults_decode_to_typed_errors() {
    assert_eq!(
        fault("Login-InvalidLogin"),
        VsphereError::InvalidLogin {
            username: "user".into()
        }
    );
    assert_eq!(
        fault("FindByInventoryPath-NotAuthenticated"),
        VsphereError::NotAuthenticated
    );
    assert_eq!(
        fault("CreateFolder-after-Logout"),
        VsphereError::NotAuthenticated
    );
    assert_eq!(
        fault("CreateFolder-DuplicateName"),
        VsphereError::DuplicateName {
            name: "fixtures".into(),
            location: "folder-3".into()
        }
    );
    assert_eq!(
        fault("CloneVM_Task-ManagedObjectNotFound"),
        VsphereError::NotFound {
            kind: "VirtualMachine".into(),
            name: "vm-9999".into()
        }
    );
}

#[test]
fn not_authenticated_inside_missing_set_is_detected() {
    let node = ok("RetrievePropertiesEx-NotAuthenticated");
    assert!(crate::session::missing_not_authenticated(&node));
    let objects = object_contents(&node);
    assert_eq!(objects[0].missing[0].path, "name");
    assert_eq!(objects[0].missing[0].fault.kind, "NotAuthenticated");
    assert!(!crate::session::missing_not_authenticated(&ok(
        "RetrievePropertiesEx-vm"
    )));
}

#[test]
fn inventory_paths() {
    let found = ok("FindByInventoryPath-vm");
    assert_eq!(
        found.child("returnval").and_then(MoRef::from_node),
        Some(MoRef::new("VirtualMachine", "vm-63"))
    );
    assert_eq!(ok("FindByInventoryPath-none").child("returnval"), None);
    let created = ok("CreateFolder");
    assert_eq!(
        created
            .child("returnval")
            .and_then(MoRef::from_node)
            .unwrap()
            .kind,
        "Folder"
    );
}

fn vm_properties() -> VmProperties {
    let objects = object_contents(&ok("RetrievePropertiesEx-vm"));
    assert_eq!(objects.len(), 1);
    VmProperties::from_content(&objects[0])
}

#[test]
fn vm_properties_decode() {
    let vm = vm_properties();
    assert_eq!(vm.obj, Some(MoRef::new("VirtualMachine", "vm-63")));
    assert_eq!(vm.name.as_deref(), Some("DC0_C0_RP0_VM0"));
    assert_eq!(vm.parent.as_ref().map(|p| p.kind.as_str()), Some("Folder"));
    assert_eq!(vm.hardware.num_cpu, Some(1));
    assert_eq!(vm.hardware.memory_mb, Some(32));
    let disk = vm.hardware.first_disk().unwrap();
    assert_eq!(disk.capacity_kib(), Some(1024));
    assert!(disk.key().is_some());
    let nic = vm.hardware.nics().next().unwrap();
    assert_eq!(nic.mac_address(), Some("00:0c:29:33:34:38"));
    let dvpg = NetworkBacking::Distributed {
        switch_uuid: "x".into(),
        portgroup_key: nic
            .0
            .path("backing.port.portgroupKey")
            .unwrap()
            .text
            .clone(),
    };
    assert!(dvpg.matches(nic.0.child("backing")));
    assert_eq!(vm.runtime.power_state, Some(PowerState::PoweredOn));
    assert!(vm.runtime.host.is_some());
    assert_eq!(vm.extra("govcsim"), Some("TRUE"));
    assert!(!vm.guest.tools_running());
    let summary = vm.summary.unwrap();
    assert_eq!(summary.name.as_deref(), Some("DC0_C0_RP0_VM0"));
    assert_eq!(summary.num_cpu, Some(1));
}

#[test]
fn distributed_port_group() {
    let objects = object_contents(&ok("RetrievePropertiesEx-dvpg"));
    let pg: &ObjectContent = &objects[0];
    assert_eq!(pg.prop("config.key").unwrap().text, "dvportgroup-13");
    let dvs = MoRef::from_node(pg.prop("config.distributedVirtualSwitch").unwrap()).unwrap();
    assert!(dvs.kind.ends_with("DistributedVirtualSwitch"), "{dvs}");
}

#[test]
fn failed_task_info() {
    let objects = object_contents(&ok("RetrievePropertiesEx-Task-InvalidPowerState"));
    let mut info = TaskInfo::default();
    for (path, val) in &objects[0].props {
        info.apply(path, Some(val));
    }
    assert_eq!(info.state, Some(TaskState::Error));
    let err = info.error.unwrap().into_error("u");
    assert_eq!(
        err,
        VsphereError::InvalidPowerState {
            message: "VM is poweredOn, the operation needs poweredOn".into()
        }
    );
}

#[test]
fn updates_decode() {
    let initial = decode_updates(&ok("WaitForUpdatesEx-initial"));
    assert_eq!(initial.version.as_deref(), Some("-"));
    let mut vm = VmProperties::default();
    for c in &initial.changes {
        assert_eq!(c.obj, MoRef::new("VirtualMachine", "vm-63"));
        vm.apply(&c.path, c.val.as_ref());
    }
    assert_eq!(vm.runtime.power_state, Some(PowerState::PoweredOn));
    assert!(!vm.guest.tools_running());
    let change = decode_updates(&ok("WaitForUpdatesEx-change"));
    for c in &change.changes {
        vm.apply(&c.path, c.val.as_ref());
    }
    assert!(vm.guest.tools_running());
    assert_eq!(
        vm.guest.usable_ipv4(),
        Some(std::net::Ipv4Addr::new(10, 0, 0, 42))
    );
    let idle = decode_updates(&ok("WaitForUpdatesEx-timeout"));
    assert_eq!(idle.version, None);
    assert!(idle.changes.is_empty());
}

#[test]
fn clone_request_round_trips_devices_as_read() {
    let vm = vm_properties();
    let disk = vm
        .hardware
        .first_disk()
        .unwrap()
        .with_capacity_kib(40 * 1024 * 1024);
    let net = NetworkBacking::Standard {
        name: "VM Network".into(),
        network: MoRef::new("Network", "network-7"),
    };
    let nic = vm.hardware.nics().next().unwrap().with_backing(&net);
    let spec = CloneSpec {
        datastore: MoRef::new("Datastore", "datastore-1"),
        pool: MoRef::new("ResourcePool", "resgroup-26"),
        config: ConfigSpec {
            num_cpus: Some(2),
            memory_mb: Some(4096),
            device_changes: vec![("edit", disk.clone()), ("edit", nic.clone())],
            extra_config: vec![("dvmm.vmId".into(), "id-1".into())],
        },
    };
    let mut env = Envelope::new("CloneVM_Task");
    methods::write_clone(
        &mut env,
        &MoRef::new("VirtualMachine", "vm-63"),
        &MoRef::new("Folder", "folder-68"),
        "web-app01",
        &spec,
    );
    let xml = env.finish();
    let (root, _) = parse_document(xml.as_bytes()).unwrap();
    let body = root.child("Body").unwrap().child("CloneVM_Task").unwrap();
    let order: Vec<&str> = body.children.iter().map(|c| c.name.as_ref()).collect();
    assert_eq!(order, ["_this", "folder", "name", "spec"]);
    let config = body.path("spec.config").unwrap();
    let order: Vec<&str> = config.children.iter().map(|c| c.name.as_ref()).collect();
    assert_eq!(
        order,
        [
            "numCPUs",
            "memoryMB",
            "deviceChange",
            "deviceChange",
            "extraConfig"
        ]
    );
    let changes: Vec<&Node> = config.children_named("deviceChange").collect();
    assert_eq!(
        changes[0].child("device").unwrap(),
        &Node {
            name: "device".into(),
            ..disk.0.clone()
        }
    );
    assert_eq!(
        changes[1].child("device").unwrap(),
        &Node {
            name: "device".into(),
            ..nic.0.clone()
        }
    );
    assert_eq!(
        changes[0].path("device.capacityInKB").unwrap().text,
        (40u64 * 1024 * 1024).to_string()
    );
    assert!(
        changes[0].path("device.deviceInfo.label").is_some(),
        "vcsim needs deviceInfo"
    );
    assert_eq!(body.path("spec.powerOn").unwrap().text, "false");
    let value = body.path("spec.config.extraConfig.value").unwrap();
    assert_eq!(value.xsi_type.as_deref(), Some("string"));
}

#[test]
fn customization_has_one_nic_setting_per_nic() {
    let mut env = Envelope::new("CustomizeVM_Task");
    methods::write_customization(&mut env, "web-app01", "localdomain", 2);
    let (root, _) = parse_document(env.finish().as_bytes()).unwrap();
    let spec = root.path("Body.CustomizeVM_Task.spec").unwrap();
    let identity = spec.child("identity").unwrap();
    assert_eq!(identity.xsi_type.as_deref(), Some("CustomizationLinuxPrep"));
    assert_eq!(identity.path("hostName.name").unwrap().text, "web-app01");
    let maps: Vec<&Node> = spec.children_named("nicSettingMap").collect();
    assert_eq!(maps.len(), 2);
    assert_eq!(
        maps[0].path("adapter.ip").unwrap().xsi_type.as_deref(),
        Some("CustomizationDhcpIpGenerator")
    );
}
