//! The few vim25 data types the adapter needs, decoded from [`Node`]s.
//!
//! Decoding is lenient on purpose: vcsim (and some vCenter versions) omit
//! fields the API calls required. Absent fields stay absent (`None`), and one
//! object's oddity never fails the others.

use std::net::{IpAddr, Ipv4Addr};

use crate::soap::{Fault, Node};

/// A managed object reference: `<x type="VirtualMachine">vm-42</x>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MoRef {
    /// The managed object type (`VirtualMachine`, `Folder`, …).
    pub kind: String,
    /// Its id (`vm-42`); may contain `[`, `]`, `/`, `@`.
    pub value: String,
}

impl MoRef {
    /// A reference of that type and id.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Reads a reference element; `None` when it has no `type` or no id.
    pub fn from_node(node: &Node) -> Option<Self> {
        let kind = node.mo_type.as_ref()?;
        let value = node.text.trim();
        if kind.is_empty() || value.is_empty() {
            return None;
        }
        Some(Self::new(kind.as_str(), value))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The parts of `ServiceContent` the adapter uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceContent {
    /// Inventory root.
    pub root_folder: MoRef,
    /// The root property collector.
    pub property_collector: MoRef,
    /// `SearchIndex`.
    pub search_index: MoRef,
    /// `SessionManager`.
    pub session_manager: MoRef,
    /// `EventManager` (absent on a bare ESXi host's API or a stripped-down
    /// test server: customization outcomes cannot be read then).
    pub event_manager: Option<MoRef>,
    /// API version, e.g. `6.5`.
    pub api_version: String,
}

impl ServiceContent {
    /// Decodes `RetrieveServiceContentResponse/returnval`.
    pub fn from_node(node: &Node) -> Option<Self> {
        let r = |name: &str| node.child(name).and_then(MoRef::from_node);
        Some(Self {
            root_folder: r("rootFolder")?,
            property_collector: r("propertyCollector")?,
            search_index: r("searchIndex")?,
            session_manager: r("sessionManager")?,
            event_manager: r("eventManager"),
            api_version: node
                .path("about.apiVersion")
                .map(|n| n.text.clone())
                .unwrap_or_default(),
        })
    }
}

/// A property that could not be read, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingProperty {
    /// The property path.
    pub path: String,
    /// Why (`NotAuthenticated`, `NoPermission`, …).
    pub fault: Fault,
}

impl MissingProperty {
    /// Reads a `missingSet` element; a missing fault reads as `MethodFault`.
    pub fn from_node(node: &Node) -> Self {
        Self {
            path: node.child_text("path").unwrap_or_default().to_owned(),
            fault: node
                .child("fault")
                .map(Fault::from_localized)
                .unwrap_or_else(|| Fault {
                    kind: "MethodFault".into(),
                    message: String::new(),
                    detail: None,
                }),
        }
    }
}

/// One object of a `RetrievePropertiesEx` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectContent {
    /// The object.
    pub obj: Option<MoRef>,
    /// Property path and value (`val` element).
    pub props: Vec<(String, Node)>,
    /// Properties the server could not read.
    pub missing: Vec<MissingProperty>,
}

impl ObjectContent {
    /// Decodes an `objects` element.
    pub fn from_node(node: &Node) -> Self {
        let mut content = ObjectContent {
            obj: node.child("obj").and_then(MoRef::from_node),
            ..Self::default()
        };
        for child in &node.children {
            match child.name.as_ref() {
                "propSet" => {
                    if let (Some(name), Some(val)) = (child.child_text("name"), child.child("val"))
                    {
                        content.props.push((name.to_owned(), val.clone()));
                    }
                }
                "missingSet" => content.missing.push(MissingProperty::from_node(child)),
                _ => {}
            }
        }
        content
    }

    /// Like [`ObjectContent::from_node`], moving the values out instead of
    /// copying them (large answers decode much faster).
    pub fn from_node_owned(node: Node) -> Self {
        let mut content = ObjectContent::default();
        for mut child in node.children {
            match child.name.as_ref() {
                "obj" => content.obj = MoRef::from_node(&child),
                "propSet" => {
                    // Both the path and the value are moved out, the path
                    // first (before `swap_remove` reorders the children): the
                    // rest of the `propSet` is dropped anyway.
                    let name = child.child_mut("name").map(|n| std::mem::take(&mut n.text));
                    let val = child
                        .children
                        .iter()
                        .position(|c| c.name == "val")
                        .map(|i| child.children.swap_remove(i));
                    if let (Some(name), Some(val)) = (name, val) {
                        content.props.push((name, val));
                    }
                }
                "missingSet" => content.missing.push(MissingProperty::from_node(&child)),
                _ => {}
            }
        }
        content
    }

    /// A property's value.
    pub fn prop(&self, path: &str) -> Option<&Node> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }
}

/// Decodes a `RetrievePropertiesExResponse` (the `returnval` with `objects`).
pub fn object_contents(response: &Node) -> Vec<ObjectContent> {
    response
        .child("returnval")
        .map(|r| {
            r.children_named("objects")
                .map(ObjectContent::from_node)
                .collect()
        })
        .unwrap_or_default()
}

/// Like [`object_contents`], consuming the response.
pub fn object_contents_owned(response: Node) -> Vec<ObjectContent> {
    response
        .children
        .into_iter()
        .find(|c| c.name == "returnval")
        .map(|r| {
            r.children
                .into_iter()
                .filter(|c| c.name == "objects")
                .map(ObjectContent::from_node_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `TaskInfo.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Done.
    Success,
    /// Failed.
    Error,
}

impl TaskState {
    /// Parses the enum value.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "queued" => Some(Self::Queued),
            "running" => Some(Self::Running),
            "success" => Some(Self::Success),
            "error" => Some(Self::Error),
            _ => None,
        }
    }

    /// Whether the task has finished.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Error)
    }
}

/// What the adapter reads of a task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// `info.state`.
    pub state: Option<TaskState>,
    /// `info.result` (a managed object reference for clones).
    pub result: Option<Node>,
    /// `info.error` decoded.
    pub error: Option<Fault>,
    /// `info.startTime` as the server wrote it (`xsd:dateTime`).
    pub start_time: Option<String>,
}

impl TaskInfo {
    /// Applies one property (`info.state`, `info.result`, `info.error`, or
    /// a whole `info`).
    pub fn apply(&mut self, path: &str, val: Option<&Node>) {
        match path {
            "info" => {
                if let Some(info) = val {
                    self.apply("info.state", info.child("state"));
                    self.apply("info.result", info.child("result"));
                    self.apply("info.error", info.child("error"));
                    self.apply("info.startTime", info.child("startTime"));
                }
            }
            "info.state" => self.state = val.and_then(|v| TaskState::parse(&v.text)),
            "info.result" => self.result = val.cloned(),
            "info.error" => self.error = val.map(Fault::from_localized),
            "info.startTime" => self.start_time = non_empty(val.map(|v| v.text.as_str())),
            _ => {}
        }
    }
}

/// How a NIC is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkBacking {
    /// A standard port group.
    Standard {
        /// Port group name.
        name: String,
        /// The `Network` object.
        network: MoRef,
    },
    /// A distributed port group.
    Distributed {
        /// `DistributedVirtualSwitch.uuid`.
        switch_uuid: String,
        /// The port group key (`dvportgroup-13`).
        portgroup_key: String,
    },
}

impl NetworkBacking {
    /// The `backing` element of a NIC on this network.
    pub fn to_node(&self) -> Node {
        let mut backing = Node::new("backing");
        match self {
            NetworkBacking::Standard { name, network } => {
                backing.xsi_type = Some("VirtualEthernetCardNetworkBackingInfo".into());
                backing
                    .children
                    .push(Node::with_text("deviceName", name.clone()));
                let mut net = Node::with_text("network", network.value.clone());
                net.mo_type = Some(network.kind.clone().into());
                backing.children.push(net);
            }
            NetworkBacking::Distributed {
                switch_uuid,
                portgroup_key,
            } => {
                backing.xsi_type =
                    Some("VirtualEthernetCardDistributedVirtualPortBackingInfo".into());
                let mut port = Node::new("port");
                port.children
                    .push(Node::with_text("switchUuid", switch_uuid.clone()));
                port.children
                    .push(Node::with_text("portgroupKey", portgroup_key.clone()));
                backing.children.push(port);
            }
        }
        backing
    }

    /// Whether a NIC's backing element already points at this network.
    pub fn matches(&self, backing: Option<&Node>) -> bool {
        let Some(backing) = backing else {
            return false;
        };
        match self {
            NetworkBacking::Standard { name, network } => {
                backing.xsi_type.as_deref() == Some("VirtualEthernetCardNetworkBackingInfo")
                    && (backing.child_text("deviceName") == Some(name.as_str())
                        || backing.child("network").and_then(MoRef::from_node).as_ref()
                            == Some(network))
            }
            NetworkBacking::Distributed { portgroup_key, .. } => {
                backing.xsi_type.as_deref()
                    == Some("VirtualEthernetCardDistributedVirtualPortBackingInfo")
                    && backing.path("port.portgroupKey").map(|n| n.text.as_str())
                        == Some(portgroup_key.as_str())
            }
        }
    }
}

/// NIC device types (`VirtualEthernetCard` subclasses).
const NIC_TYPES: &[&str] = &[
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualVmxnet",
    "VirtualVmxnet2",
    "VirtualVmxnet3",
    "VirtualVmxnet3Vrdma",
    "VirtualPCNet32",
    "VirtualSriovEthernetCard",
    "VirtualEthernetCard",
];

/// A virtual device as read (kept whole so it can be edited and sent back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device(pub Node);

impl Device {
    /// The device key.
    pub fn key(&self) -> Option<i32> {
        self.0.child_text("key").and_then(|k| k.trim().parse().ok())
    }

    /// Whether it is a virtual disk.
    pub fn is_disk(&self) -> bool {
        self.0.xsi_type.as_deref() == Some("VirtualDisk")
    }

    /// Whether it is a network card.
    pub fn is_nic(&self) -> bool {
        self.0
            .xsi_type
            .as_deref()
            .is_some_and(|t| NIC_TYPES.contains(&t))
    }

    /// A disk's capacity in KiB.
    pub fn capacity_kib(&self) -> Option<u64> {
        if let Some(bytes) = self
            .0
            .child_text("capacityInBytes")
            .and_then(|b| b.trim().parse::<u64>().ok())
        {
            return Some(bytes / 1024);
        }
        self.0
            .child_text("capacityInKB")
            .and_then(|k| k.trim().parse().ok())
    }

    /// The same disk grown to `kib` (both capacity fields, when present, so
    /// they agree).
    pub fn with_capacity_kib(&self, kib: u64) -> Device {
        let mut node = self.0.clone();
        node.set_child_text("capacityInKB", kib.to_string());
        if node.child("capacityInBytes").is_some() {
            node.set_child_text("capacityInBytes", (kib * 1024).to_string());
        }
        Device(node)
    }

    /// The same NIC on another network.
    pub fn with_backing(&self, backing: &NetworkBacking) -> Device {
        let mut node = self.0.clone();
        node.replace_child(backing.to_node());
        Device(node)
    }

    /// The NIC's MAC address.
    pub fn mac_address(&self) -> Option<&str> {
        self.0.child_text("macAddress")
    }
}

/// `config.hardware`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hardware {
    /// vCPUs.
    pub num_cpu: Option<u32>,
    /// Memory in MiB.
    pub memory_mb: Option<u64>,
    /// Devices.
    pub devices: Vec<Device>,
}

impl Hardware {
    /// Decodes a `VirtualHardware` value.
    pub fn from_node(node: &Node) -> Self {
        Self {
            num_cpu: node
                .child_text("numCPU")
                .and_then(|v| v.trim().parse().ok()),
            memory_mb: node
                .child_text("memoryMB")
                .and_then(|v| v.trim().parse().ok()),
            devices: devices_from(node),
        }
    }

    /// Like [`Hardware::from_node`], moving the devices out.
    pub fn from_node_owned(node: Node) -> Self {
        let mut hw = Self {
            num_cpu: node
                .child_text("numCPU")
                .and_then(|v| v.trim().parse().ok()),
            memory_mb: node
                .child_text("memoryMB")
                .and_then(|v| v.trim().parse().ok()),
            devices: Vec::new(),
        };
        hw.devices = node
            .children
            .into_iter()
            .filter(|c| c.name == "device")
            .map(Device)
            .collect();
        hw
    }

    /// The first virtual disk.
    pub fn first_disk(&self) -> Option<&Device> {
        self.devices.iter().find(|d| d.is_disk())
    }

    /// Network cards in device order.
    pub fn nics(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.is_nic())
    }
}

/// Reads devices from a `VirtualHardware` or an `ArrayOfVirtualDevice` value.
pub fn devices_from(node: &Node) -> Vec<Device> {
    let tag = if node.child("VirtualDevice").is_some() {
        "VirtualDevice"
    } else {
        "device"
    };
    node.children_named(tag).cloned().map(Device).collect()
}

/// `runtime.powerState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// On.
    PoweredOn,
    /// Off.
    PoweredOff,
    /// Suspended.
    Suspended,
}

impl PowerState {
    /// Parses the enum value.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "poweredOn" => Some(Self::PoweredOn),
            "poweredOff" => Some(Self::PoweredOff),
            "suspended" => Some(Self::Suspended),
            _ => None,
        }
    }
}

impl From<PowerState> for dvmm_core::spec::PowerState {
    fn from(state: PowerState) -> Self {
        match state {
            PowerState::PoweredOn => Self::PoweredOn,
            PowerState::PoweredOff => Self::PoweredOff,
            PowerState::Suspended => Self::Suspended,
        }
    }
}

/// `guest` (the parts that matter for "is it up and where").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInfo {
    /// `toolsRunningStatus` (`guestToolsRunning`, …).
    pub tools_running_status: Option<String>,
    /// Primary IP address.
    pub ip_address: Option<String>,
    /// Guest hostname.
    pub host_name: Option<String>,
    /// Addresses per NIC.
    pub nic_addresses: Vec<Vec<String>>,
}

impl GuestInfo {
    /// Decodes a `GuestInfo` value.
    pub fn from_node(node: &Node) -> Self {
        let mut guest = Self {
            tools_running_status: non_empty(node.child_text("toolsRunningStatus")),
            ip_address: non_empty(node.child_text("ipAddress")),
            host_name: non_empty(node.child_text("hostName")),
            nic_addresses: Vec::new(),
        };
        for net in node.children_named("net") {
            guest.nic_addresses.push(nic_addresses(net));
        }
        guest
    }

    /// Applies one property change below `guest`.
    pub fn apply(&mut self, path: &str, val: Option<&Node>) {
        match path {
            "guest" => *self = val.map(Self::from_node).unwrap_or_default(),
            "guest.toolsRunningStatus" => {
                self.tools_running_status = non_empty(val.map(|v| v.text.as_str()))
            }
            "guest.ipAddress" => self.ip_address = non_empty(val.map(|v| v.text.as_str())),
            "guest.hostName" => self.host_name = non_empty(val.map(|v| v.text.as_str())),
            "guest.net" => {
                self.nic_addresses = val
                    .map(|v| v.children.iter().map(nic_addresses).collect())
                    .unwrap_or_default()
            }
            _ => {}
        }
    }

    /// Whether VMware Tools runs in the guest.
    pub fn tools_running(&self) -> bool {
        self.tools_running_status.as_deref() == Some("guestToolsRunning")
    }

    /// The first usable IPv4 address: the primary one if usable, else the
    /// first usable one of any NIC.
    pub fn usable_ipv4(&self) -> Option<Ipv4Addr> {
        self.ip_address
            .iter()
            .chain(self.nic_addresses.iter().flatten())
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|ip| is_usable_ipv4(*ip))
    }
}

fn nic_addresses(net: &Node) -> Vec<String> {
    net.children_named("ipAddress")
        .map(|a| a.text.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect()
}

fn non_empty(text: Option<&str>) -> Option<String> {
    text.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// An address a user can reach the VM on: not loopback, link-local,
/// unspecified, broadcast or multicast.
pub fn is_usable_ipv4(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast())
}

/// Same as [`is_usable_ipv4`] for any address (IPv6 is never "usable" here:
/// the port promises an IPv4).
pub fn is_usable_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_usable_ipv4(v4),
        IpAddr::V6(_) => false,
    }
}

/// `runtime` (a few fields).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// Power state.
    pub power_state: Option<PowerState>,
    /// Host it runs on.
    pub host: Option<MoRef>,
    /// Connection state.
    pub connection_state: Option<String>,
}

impl Runtime {
    /// Decodes a `VirtualMachineRuntimeInfo`.
    pub fn from_node(node: &Node) -> Self {
        Self {
            power_state: node.child_text("powerState").and_then(PowerState::parse),
            host: node.child("host").and_then(MoRef::from_node),
            connection_state: non_empty(node.child_text("connectionState")),
        }
    }
}

/// `summary` (a few fields).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// `summary.config.name`.
    pub name: Option<String>,
    /// `summary.config.numCpu`.
    pub num_cpu: Option<u32>,
    /// `summary.config.memorySizeMB`.
    pub memory_mb: Option<u64>,
    /// `summary.guest.ipAddress`.
    pub ip_address: Option<String>,
    /// `summary.storage.committed`.
    pub storage_committed: Option<i64>,
}

impl Summary {
    /// Decodes a `VirtualMachineSummary`.
    pub fn from_node(node: &Node) -> Self {
        let t = |p: &str| node.path(p).map(|n| n.text.trim());
        Self {
            name: non_empty(t("config.name")),
            num_cpu: t("config.numCpu").and_then(|v| v.parse().ok()),
            memory_mb: t("config.memorySizeMB").and_then(|v| v.parse().ok()),
            ip_address: non_empty(t("guest.ipAddress")),
            storage_committed: t("storage.committed").and_then(|v| v.parse().ok()),
        }
    }
}

/// What the adapter reads of a VM, from any subset of its properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmProperties {
    /// The VM.
    pub obj: Option<MoRef>,
    /// `name`.
    pub name: Option<String>,
    /// `parent`.
    pub parent: Option<MoRef>,
    /// `config.hardware` (or its parts).
    pub hardware: Hardware,
    /// `guest` (or its parts).
    pub guest: GuestInfo,
    /// `runtime` (or its parts).
    pub runtime: Runtime,
    /// `summary`.
    pub summary: Option<Summary>,
    /// `config.extraConfig` key/value pairs.
    pub extra_config: Vec<(String, String)>,
}

impl VmProperties {
    /// Decodes one object of a `RetrievePropertiesEx` answer.
    pub fn from_content(content: &ObjectContent) -> Self {
        let mut vm = Self {
            obj: content.obj.clone(),
            ..Self::default()
        };
        for (path, val) in &content.props {
            vm.apply(path, Some(val));
        }
        vm
    }

    /// Like [`VmProperties::from_content`], consuming the content.
    pub fn from_content_owned(content: ObjectContent) -> Self {
        let mut vm = Self {
            obj: content.obj,
            ..Self::default()
        };
        for (path, val) in content.props {
            if path == "config.hardware" {
                vm.hardware = Hardware::from_node_owned(val);
            } else {
                vm.apply(&path, Some(&val));
            }
        }
        vm
    }

    /// Applies one property value.
    pub fn apply(&mut self, path: &str, val: Option<&Node>) {
        match path {
            "name" => self.name = non_empty(val.map(|v| v.text.as_str())),
            "parent" => self.parent = val.and_then(MoRef::from_node),
            "config.hardware" => self.hardware = val.map(Hardware::from_node).unwrap_or_default(),
            "config.hardware.numCPU" => {
                self.hardware.num_cpu = val.and_then(|v| v.text.trim().parse().ok())
            }
            "config.hardware.memoryMB" => {
                self.hardware.memory_mb = val.and_then(|v| v.text.trim().parse().ok())
            }
            "config.hardware.device" => {
                self.hardware.devices = val.map(devices_from).unwrap_or_default()
            }
            "config.extraConfig" => {
                self.extra_config = val
                    .map(|v| {
                        v.children
                            .iter()
                            .filter_map(|o| {
                                Some((
                                    o.child_text("key")?.to_owned(),
                                    o.child_text("value").unwrap_or_default().to_owned(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            }
            "runtime" => self.runtime = val.map(Runtime::from_node).unwrap_or_default(),
            "runtime.powerState" => {
                self.runtime.power_state = val.and_then(|v| PowerState::parse(&v.text))
            }
            "summary" => self.summary = val.map(Summary::from_node),
            p if p == "guest" || p.starts_with("guest.") => self.guest.apply(p, val),
            _ => {}
        }
    }

    /// The value of an extraConfig key (the last one wins, as in a .vmx).
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extra_config
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_addresses() {
        let g = GuestInfo {
            ip_address: Some("169.254.1.2".into()),
            nic_addresses: vec![vec![
                "fe80::1".into(),
                "127.0.0.1".into(),
                "10.1.2.3".into(),
            ]],
            ..GuestInfo::default()
        };
        assert_eq!(g.usable_ipv4(), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(GuestInfo::default().usable_ipv4(), None);
        assert!(!is_usable_ip("::1".parse().unwrap()));
    }
}
