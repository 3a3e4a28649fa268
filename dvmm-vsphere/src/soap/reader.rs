//! The response reader: a namespace-aware reader of SOAP answers into a
//! small element tree ([`Node`]).
//!
//! vim25 types its values with `xsi:type`, but the prefix that stands for the
//! `XMLSchema-instance` namespace varies (vCenter and vcsim declare a local
//! `XMLSchema-instance` prefix on property values and use `xsi` on faults),
//! so the reader resolves prefixes instead of matching them literally.
//! Declarations are kept on a stack of scopes that only elements declaring
//! namespaces touch, so resolution stays linear in the size of the answer.

use std::borrow::Cow;
use std::sync::OnceLock;

use dvmm_core::ports::VsphereError;
use quick_xml::Reader;
use quick_xml::events::{BytesRef, BytesStart, Event};

use super::fault::{Fault, decode_fault};

/// The SOAP 1.1 envelope namespace.
pub const SOAP_ENV_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The XML Schema instance namespace (`xsi:type`).
pub const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// The vim25 namespace.
pub const VIM25_NS: &str = "urn:vim25";

/// Deepest element nesting accepted. vim25 responses stay far below it; the
/// limit keeps hostile input from exhausting the stack when a tree is dropped.
pub const MAX_DEPTH: usize = 128;

/// One XML element of a response: its local name, its `xsi:type` (local part,
/// without prefix), its plain `type` attribute (managed object references carry
/// their type there), its text and its child elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Local name of the element (vim25's common names are shared, not
    /// allocated per element).
    pub name: Cow<'static, str>,
    /// Local part of the resolved `xsi:type`, e.g. `VirtualDisk` or `string`.
    pub xsi_type: Option<TypeName>,
    /// The unqualified `type` attribute, as on a managed object reference.
    pub mo_type: Option<TypeName>,
    /// Concatenated text content (entities resolved).
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// A new element with a name and nothing else.
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// A new element holding text.
    pub fn with_text(name: impl Into<Cow<'static, str>>, text: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
            ..Self::default()
        }
    }

    /// The first child with that local name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The first child with that local name, mutably.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// All children with that local name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child with that name.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Follows a dotted path of child names (`"guest.ipAddress"`).
    pub fn path(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for part in path.split('.') {
            node = node.child(part)?;
        }
        Some(node)
    }

    /// Sets (or adds) a child's text.
    pub fn set_child_text(&mut self, name: &str, text: impl Into<String>) {
        let text = text.into();
        match self.child_mut(name) {
            Some(child) => child.text = text,
            None => self.children.push(Node::with_text(name.to_owned(), text)),
        }
    }

    /// Replaces the first child with that name, or appends `node` when absent.
    pub fn replace_child(&mut self, node: Node) {
        match self.children.iter_mut().find(|c| c.name == node.name) {
            Some(child) => *child = node,
            None => self.children.push(node),
        }
    }
}

/// A vim25 type name, as in `xsi:type="VirtualDisk"` or the `type` of a
/// managed object reference. Reads like a `&str` (it dereferences to one).
///
/// The names the reader knows are shared instead of allocated per element,
/// and the type is kept to two words: about one element in five of a large
/// answer is typed, and the tree's size is much of what reading it costs.
#[derive(Clone)]
pub struct TypeName(TypeRepr);

#[derive(Clone)]
enum TypeRepr {
    Shared(&'static &'static str),
    // Boxed twice so that the pointer is thin, like the shared one.
    Owned(Box<Box<str>>),
}

impl TypeName {
    fn from_str_ref(name: &str) -> Self {
        match known_name(name.as_bytes()) {
            Some(known) => Self(TypeRepr::Shared(known)),
            None => Self(TypeRepr::Owned(Box::new(name.into()))),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TypeRepr::Shared(name) => name,
            TypeRepr::Owned(name) => name,
        }
    }
}

impl std::ops::Deref for TypeName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for TypeName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for TypeName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for TypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for TypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for TypeName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for TypeName {}

impl std::hash::Hash for TypeName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for TypeName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TypeName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&str> for TypeName {
    fn from(name: &str) -> Self {
        Self::from_str_ref(name)
    }
}

impl From<String> for TypeName {
    fn from(name: String) -> Self {
        match known_name(name.as_bytes()) {
            Some(known) => Self(TypeRepr::Shared(known)),
            None => Self(TypeRepr::Owned(Box::new(name.into_boxed_str()))),
        }
    }
}

impl From<TypeName> for String {
    fn from(name: TypeName) -> Self {
        name.as_str().to_owned()
    }
}

/// Why a response could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Not well-formed XML (or not UTF-8).
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("XML nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// Well-formed, but not a SOAP envelope with a body.
    #[error("not a SOAP response: {0}")]
    NotSoap(String),
}

impl From<ReadError> for VsphereError {
    fn from(err: ReadError) -> Self {
        VsphereError::Protocol {
            message: err.to_string(),
        }
    }
}

pub(crate) fn local_name(qname: &[u8]) -> &[u8] {
    match qname.iter().rposition(|b| *b == b':') {
        Some(i) => &qname[i + 1..],
        None => qname,
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, ReadError> {
    std::str::from_utf8(bytes).map_err(|e| ReadError::Malformed(e.to_string()))
}

/// Element names of vim25 answers, shared instead of allocated per element:
/// a large `RetrievePropertiesEx` holds hundreds of thousands of elements
/// with fewer than two hundred distinct names.
const KNOWN_NAMES: &[&str] = &[
    "Body",
    "CreateFilterResponse",
    "CreateFolderResponse",
    "CreatePropertyCollectorResponse",
    "DestroyPropertyCollectorResponse",
    "DuplicateNameFault",
    "Envelope",
    "Fault",
    "FindByInventoryPathResponse",
    "GuestNicInfo",
    "Header",
    "InvalidLoginFault",
    "LoginResponse",
    "LogoutResponse",
    "ManagedObjectNotFoundFault",
    "NotAuthenticatedFault",
    "OptionValue",
    "PowerOnVM_TaskResponse",
    "ReconfigVM_TaskResponse",
    "RetrievePropertiesExResponse",
    "RetrieveServiceContentResponse",
    "WaitForUpdatesExResponse",
    "about",
    "addressType",
    "alarmManager",
    "allowGuestControl",
    "allowUnrestrictedCommunication",
    "apiType",
    "apiVersion",
    "authorizationManager",
    "backing",
    "bootTime",
    "build",
    "busNumber",
    "callCount",
    "capacityInBytes",
    "capacityInKB",
    "certificateManager",
    "changeSet",
    "childEntity",
    "clusterProfileManager",
    "committed",
    "complianceManager",
    "config",
    "configStatus",
    "connectable",
    "connected",
    "connectionState",
    "controllerKey",
    "cryptoManager",
    "currentSession",
    "customFieldsManager",
    "customizationSpecManager",
    "datastore",
    "datastoreNamespaceManager",
    "detail",
    "device",
    "deviceConfigId",
    "deviceInfo",
    "deviceName",
    "diagnosticManager",
    "digestEnabled",
    "diskMode",
    "dvSwitchManager",
    "eagerlyScrub",
    "enable3DSupport",
    "entity",
    "error",
    "eventManager",
    "existingState",
    "extensionManager",
    "extensionSession",
    "extraConfig",
    "failoverClusterConfigurator",
    "failoverClusterManager",
    "fault",
    "faultcode",
    "faultstring",
    "fileManager",
    "fileName",
    "filter",
    "filterEnable",
    "filterSet",
    "fullName",
    "graphicsMemorySizeInKB",
    "guest",
    "guestFamily",
    "guestFullName",
    "guestHeartbeatStatus",
    "guestId",
    "guestOperationsManager",
    "guestState",
    "healthUpdateManager",
    "host",
    "hostName",
    "hostPointingDevice",
    "hostProfileManager",
    "hostSpecManager",
    "id",
    "info",
    "instanceUuid",
    "ioFilterManager",
    "ipAddress",
    "ipPoolManager",
    "key",
    "kind",
    "label",
    "lastActiveTime",
    "licenseManager",
    "licenseProductName",
    "licenseProductVersion",
    "locale",
    "localeBuild",
    "localeVersion",
    "localizationManager",
    "localizedMessage",
    "loginTime",
    "macAddress",
    "memoryMB",
    "memorySizeMB",
    "messageLocale",
    "missingSet",
    "name",
    "net",
    "numCPU",
    "numCoresPerSocket",
    "numCpu",
    "numDisplays",
    "numEthernetCards",
    "numMksConnections",
    "numVirtualDisks",
    "obj",
    "object",
    "objectSet",
    "objects",
    "op",
    "osType",
    "overallStatus",
    "overheadMemoryManager",
    "ovfManager",
    "path",
    "pciSlotNumber",
    "perfManager",
    "port",
    "portgroupKey",
    "powerState",
    "privilegeId",
    "productLineId",
    "propSet",
    "propertyCollector",
    "quickStats",
    "requestedState",
    "result",
    "returnval",
    "rootFolder",
    "runtime",
    "scheduledTaskManager",
    "scsiCtlrUnitNumber",
    "searchIndex",
    "serviceManager",
    "sessionList",
    "sessionManager",
    "setting",
    "sharedBus",
    "slotInfo",
    "snmpSystem",
    "split",
    "startConnected",
    "state",
    "status",
    "storage",
    "storageResourceManager",
    "summary",
    "switchUuid",
    "task",
    "taskManager",
    "template",
    "thinProvisioned",
    "timestamp",
    "toolsInstallerMounted",
    "toolsRunningStatus",
    "toolsStatus",
    "toolsVersion",
    "uncommitted",
    "unitNumber",
    "unshared",
    "use3dRenderer",
    "useAutoDetect",
    "userAgent",
    "userDirectory",
    "userName",
    "uuid",
    "vStorageObjectManager",
    "val",
    "value",
    "vendor",
    "version",
    "videoRamSizeInKB",
    "viewManager",
    "virtualDiskManager",
    "vm",
    "vmCompatibilityChecker",
    "vmPathName",
    "vmProvisioningChecker",
    "wakeOnLanEnabled",
    "writeThrough",
];

/// Type names that vim25 answers carry in `xsi:type` and in the `type` of
/// managed object references. Shared like [`KNOWN_NAMES`]: in a large
/// `RetrievePropertiesEx` about one element in five is typed.
const KNOWN_TYPES: &[&str] = &[
    "ArrayOfGuestNicInfo",
    "ArrayOfManagedObjectReference",
    "ArrayOfOptionValue",
    "ArrayOfString",
    "ArrayOfVirtualDevice",
    "ClusterComputeResource",
    "ComputeResource",
    "CustomizationSpecManager",
    "Datacenter",
    "Datastore",
    "Description",
    "DistributedVirtualPortgroup",
    "DistributedVirtualSwitchPortConnection",
    "DuplicateName",
    "Folder",
    "GuestInfo",
    "GuestNicInfo",
    "HostSystem",
    "InvalidArgument",
    "InvalidLogin",
    "InvalidPowerState",
    "InvalidState",
    "LocalizedMethodFault",
    "ManagedObjectNotFound",
    "ManagedObjectReference",
    "Network",
    "NoPermission",
    "NotAuthenticated",
    "OptionValue",
    "ParaVirtualSCSIController",
    "PropertyCollector",
    "PropertyFilter",
    "ResourcePool",
    "SearchIndex",
    "SessionManager",
    "Task",
    "TaskInfo",
    "VirtualAHCIController",
    "VirtualBusLogicController",
    "VirtualCdrom",
    "VirtualCdromAtapiBackingInfo",
    "VirtualCdromIsoBackingInfo",
    "VirtualCdromRemoteAtapiBackingInfo",
    "VirtualCdromRemotePassthroughBackingInfo",
    "VirtualDevicePciBusSlotInfo",
    "VirtualDisk",
    "VirtualDiskFlatVer2BackingInfo",
    "VirtualDiskSparseVer2BackingInfo",
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualEthernetCardDistributedVirtualPortBackingInfo",
    "VirtualEthernetCardNetworkBackingInfo",
    "VirtualFloppy",
    "VirtualHardware",
    "VirtualIDEController",
    "VirtualKeyboard",
    "VirtualLsiLogicController",
    "VirtualLsiLogicSASController",
    "VirtualMachine",
    "VirtualMachineRuntimeInfo",
    "VirtualMachineSummary",
    "VirtualMachineVMCIDevice",
    "VirtualMachineVideoCard",
    "VirtualNVMEController",
    "VirtualPCIController",
    "VirtualPCNet32",
    "VirtualPS2Controller",
    "VirtualPointingDevice",
    "VirtualPointingDeviceDeviceBackingInfo",
    "VirtualSIOController",
    "VirtualUSBController",
    "VirtualVmxnet3",
    "VmwareDistributedVirtualSwitch",
    "anyURI",
    "base64Binary",
    "boolean",
    "byte",
    "dateTime",
    "double",
    "float",
    "int",
    "long",
    "short",
    "string",
];

/// A name reduced to two words and its length: for names of up to 16 bytes
/// the words hold every byte, so comparing them is comparing the names.
#[derive(Clone, Copy, PartialEq, Eq)]
struct NameKey {
    head: u64,
    tail: u64,
    len: usize,
}

impl NameKey {
    fn of(bytes: &[u8]) -> Self {
        // Fixed-size loads only, overlapping when the name is short.
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let half = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[at..at + 4]);
            u64::from(u32::from_le_bytes(w))
        };
        let len = bytes.len();
        let (head, tail) = if len >= 8 {
            (word(0), word(len - 8))
        } else if len >= 4 {
            (half(0), half(len - 4))
        } else if len > 0 {
            let three = u64::from(bytes[0])
                | (u64::from(bytes[len / 2]) << 8)
                | (u64::from(bytes[len - 1]) << 16);
            (three, 0)
        } else {
            (0, 0)
        };
        Self { head, tail, len }
    }

    fn slot(&self) -> usize {
        let hash = (self.head.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ self.tail.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ self.len as u64)
            .wrapping_mul(0x1656_67b1_9e37_79f9);
        (hash >> (64 - NAME_SLOTS.trailing_zeros())) as usize
    }
}

/// Size of the open-addressing table of shared names: a power of two, about
/// four times the number of names so that probes stay short.
const NAME_SLOTS: usize = 1024;

/// Known names by [`NameKey::slot`], with linear probing. Hand-made rather
/// than a `HashMap`: the lookup runs for every element and every type
/// attribute, and most of it is comparing two words.
struct NameTable {
    slots: Vec<Option<(NameKey, &'static &'static str)>>,
}

impl NameTable {
    fn new() -> Self {
        let mut slots = vec![None; NAME_SLOTS];
        for name in KNOWN_NAMES.iter().chain(KNOWN_TYPES) {
            let key = NameKey::of(name.as_bytes());
            let mut i = key.slot();
            loop {
                match slots[i] {
                    None => {
                        slots[i] = Some((key, name));
                        break;
                    }
                    Some((_, known)) if *known == *name => break,
                    Some(_) => i = (i + 1) % NAME_SLOTS,
                }
            }
        }
        Self { slots }
    }

    fn get(&self, bytes: &[u8]) -> Option<&'static &'static str> {
        let key = NameKey::of(bytes);
        let mut i = key.slot();
        // The table is never full, so an empty slot ends every probe.
        while let Some(Some((known_key, known))) = self.slots.get(i) {
            if *known_key == key && (key.len <= 16 || known.as_bytes() == bytes) {
                return Some(known);
            }
            i = (i + 1) % NAME_SLOTS;
        }
        None
    }
}

fn known_name(bytes: &[u8]) -> Option<&'static &'static str> {
    static TABLE: OnceLock<NameTable> = OnceLock::new();
    TABLE.get_or_init(NameTable::new).get(bytes)
}

/// The shared copy of a known element name, or an owned one.
fn shared_name(local: &[u8]) -> Result<Cow<'static, str>, ReadError> {
    match known_name(local) {
        Some(name) => Ok(Cow::Borrowed(*name)),
        None => Ok(Cow::Owned(utf8(local)?.to_owned())),
    }
}

/// In-scope namespace declarations: a stack of (element depth, prefix,
/// URI) in document order, and an index from each prefix to its innermost
/// declaration, so that resolving a prefix costs the same however many
/// declarations are in scope (a hostile answer can declare thousands on
/// the root, and a scan per typed element would make reading it quadratic).
/// Only elements that declare namespaces touch it, so plain vim25 payloads
/// pay nothing for resolution.
#[derive(Default)]
struct Scopes {
    decls: Vec<Declaration>,
    innermost: std::collections::HashMap<Cow<'static, [u8]>, usize>,
}

/// Where a namespace was declared (element depth), its prefix, its URI,
/// and the declaration of the same prefix it shadows.
type Declaration = (usize, Cow<'static, [u8]>, Cow<'static, [u8]>, Option<usize>);

/// Prefixes and namespaces that vim25 answers declare over and over (vcsim
/// declares the schema-instance namespace again on every property value):
/// shared instead of copied.
const KNOWN_NAMESPACE_PARTS: &[&str] = &[
    "",
    "XMLSchema-instance",
    "soapenc",
    "soapenv",
    "xsd",
    "xsi",
    SOAP_ENV_NS,
    VIM25_NS,
    XSI_NS,
    "http://schemas.xmlsoap.org/soap/encoding/",
    "http://www.w3.org/2001/XMLSchema",
];

fn namespace_part(bytes: &[u8]) -> Cow<'static, [u8]> {
    match KNOWN_NAMESPACE_PARTS
        .iter()
        .find(|known| known.as_bytes() == bytes)
    {
        Some(known) => Cow::Borrowed(known.as_bytes()),
        None => Cow::Owned(bytes.to_vec()),
    }
}

impl Scopes {
    fn declare(&mut self, depth: usize, prefix: &[u8], uri: &[u8]) {
        let prefix = namespace_part(prefix);
        let shadowed = self.innermost.insert(prefix.clone(), self.decls.len());
        self.decls
            .push((depth, prefix, namespace_part(uri), shadowed));
    }

    fn resolve(&self, prefix: &[u8]) -> Option<&[u8]> {
        self.innermost
            .get(prefix)
            .map(|&i| self.decls[i].2.as_ref())
    }

    fn leave(&mut self, depth: usize) {
        while self.decls.last().is_some_and(|(d, ..)| *d >= depth) {
            if let Some((_, prefix, _, shadowed)) = self.decls.pop() {
                match shadowed {
                    Some(outer) => self.innermost.insert(prefix, outer),
                    None => self.innermost.remove(&prefix),
                };
            }
        }
    }
}

fn split_qname(qname: &[u8]) -> (&[u8], &[u8]) {
    match qname.iter().position(|b| *b == b':') {
        Some(i) => (&qname[..i], &qname[i + 1..]),
        None => (&[], qname),
    }
}

fn attribute_error(err: impl std::fmt::Display) -> ReadError {
    ReadError::Malformed(err.to_string())
}

/// Reads the start tag of an element at `depth` and pushes its node onto
/// `done` (built in place: moving nodes around costs more than filling
/// them): records its namespace declarations, then resolves its `type`
/// attributes. Returns the element's namespace when it is the root.
fn open_node(
    scopes: &mut Scopes,
    depth: usize,
    start: &BytesStart<'_>,
    done: &mut Vec<Node>,
) -> Result<Option<String>, ReadError> {
    let qname = start.name();
    let (prefix, local) = split_qname(qname.as_ref().as_bytes());
    let name = shared_name(local)?;
    let mut xsi_type = None;
    let mut mo_type = None;
    let raw = start.attributes_raw();
    if raw.bytes().any(|b| !b.is_ascii_whitespace()) {
        match plain_attributes(raw) {
            Some(attrs) => {
                read_plain_attributes(scopes, depth, &attrs, &mut xsi_type, &mut mo_type)?
            }
            None => read_attributes(scopes, depth, start, &mut xsi_type, &mut mo_type)?,
        }
    }
    done.push(Node {
        name,
        xsi_type,
        mo_type,
        text: String::new(),
        children: Vec::new(),
    });
    Ok(if depth == 0 {
        scopes
            .resolve(prefix)
            .and_then(|u| std::str::from_utf8(u).ok())
            .map(str::to_owned)
    } else {
        None
    })
}

/// The local part of an `xsi:type` value: `xsd:string` → `string` (the
/// schema prefix carries no meaning here).
fn xsi_local(value: &str) -> &str {
    match value.rfind(':') {
        Some(i) => &value[i + 1..],
        None => value,
    }
}

/// Most attributes a start tag can hold in [`PlainAttributes`].
const PLAIN_ATTRIBUTES: usize = 4;

/// The attributes of a start tag as (name, raw value) pairs.
struct PlainAttributes<'a> {
    pairs: [(&'a [u8], &'a str); PLAIN_ATTRIBUTES],
    len: usize,
}

impl<'a> PlainAttributes<'a> {
    fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a str)> + '_ {
        self.pairs[..self.len].iter().copied()
    }
}

fn is_xml_space(b: u8) -> bool {
    matches!(b, b' ' | b'\r' | b'\n' | b'\t')
}

/// Splits the attributes of a start tag when they are a few plain
/// `name="value"` (or `'value'`) pairs, as in every vim25 answer, without
/// going through the general attribute reader. It cuts where that reader
/// cuts; anything else (spaces around `=`, a name without a value, an open
/// quote, more pairs) gives `None` and is left to that reader, which also
/// reports the errors.
fn plain_attributes(text: &str) -> Option<PlainAttributes<'_>> {
    let raw = text.as_bytes();
    let mut attrs = PlainAttributes {
        pairs: [(&[], ""); PLAIN_ATTRIBUTES],
        len: 0,
    };
    let mut at = 0;
    loop {
        while raw.get(at).copied().is_some_and(is_xml_space) {
            at += 1;
        }
        if at == raw.len() {
            return Some(attrs);
        }
        if matches!(raw[at], b'=' | b'"' | b'\'') || attrs.len == PLAIN_ATTRIBUTES {
            return None;
        }
        let key_start = at;
        while !matches!(raw.get(at), None | Some(b'=')) {
            if is_xml_space(raw[at]) {
                return None;
            }
            at += 1;
        }
        let key = &raw[key_start..at];
        let quote = *raw.get(at + 1)?;
        if quote != b'"' && quote != b'\'' {
            return None;
        }
        let value_start = at + 2;
        let value_len = raw.get(value_start..)?.iter().position(|b| *b == quote)?;
        // Both ends sit next to an ASCII quote: character boundaries.
        attrs.pairs[attrs.len] = (key, text.get(value_start..value_start + value_len)?);
        attrs.len += 1;
        at = value_start + value_len + 1;
    }
}

/// An attribute value with its entities resolved, failing the way the
/// general attribute reader fails.
fn attribute_value(raw: &str) -> Result<Cow<'_, str>, ReadError> {
    if raw.contains('&') {
        quick_xml::escape::unescape(raw).map_err(attribute_error)
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

/// The value of an attribute read by the general reader, with its entities
/// resolved and nothing else changed (no whitespace normalization, as the
/// plain path does none either).
fn general_value(value: Cow<'_, str>) -> Result<Cow<'_, str>, ReadError> {
    match value {
        Cow::Borrowed(raw) => attribute_value(raw),
        Cow::Owned(raw) => attribute_value(&raw).map(|v| Cow::Owned(v.into_owned())),
    }
}

/// [`read_attributes`] on attributes split by [`plain_attributes`]: the same
/// declarations, types and errors.
fn read_plain_attributes(
    scopes: &mut Scopes,
    depth: usize,
    attrs: &PlainAttributes<'_>,
    xsi_type: &mut Option<TypeName>,
    mo_type: &mut Option<TypeName>,
) -> Result<(), ReadError> {
    let mut bad_value = None;
    let mut prefixed: Option<(&[u8], Cow<'_, str>)> = None;
    let mut prefixed_count = 0usize;
    for (key, raw) in attrs.iter() {
        let declared = if key == b"xmlns" {
            Some(&b""[..])
        } else {
            key.strip_prefix(b"xmlns:")
        };
        if let Some(declared) = declared {
            let uri = attribute_value(raw)?;
            scopes.declare(depth, declared, uri.as_bytes());
        }
        let (attr_prefix, attr_local) = split_qname(key);
        if attr_local != b"type" || bad_value.is_some() {
            continue;
        }
        let value = match attribute_value(raw) {
            Ok(value) => value,
            Err(err) => {
                bad_value = Some(err);
                continue;
            }
        };
        if attr_prefix.is_empty() {
            *mo_type = Some(TypeName::from_str_ref(&value));
        } else if attr_prefix != b"xmlns" {
            prefixed_count += 1;
            prefixed = Some((attr_prefix, value));
        }
    }
    if let Some(err) = bad_value {
        return Err(err);
    }
    let is_xsi = |prefix: &[u8]| scopes.resolve(prefix) == Some(XSI_NS.as_bytes());
    if prefixed_count > 1 {
        for (key, raw) in attrs.iter() {
            let (attr_prefix, attr_local) = split_qname(key);
            if attr_local == b"type"
                && !attr_prefix.is_empty()
                && attr_prefix != b"xmlns"
                && is_xsi(attr_prefix)
            {
                let value = attribute_value(raw)?;
                *xsi_type = Some(TypeName::from_str_ref(xsi_local(&value)));
            }
        }
    } else if let Some((attr_prefix, value)) = prefixed
        && is_xsi(attr_prefix)
    {
        *xsi_type = Some(TypeName::from_str_ref(xsi_local(&value)));
    }
    Ok(())
}

/// Records the namespace declarations of a start tag and sets the node's
/// `type` attributes, in one pass over the attributes.
///
/// Errors come in the order a reader that first reads all declarations and
/// then the types would find them: a malformed attribute or declaration
/// anywhere in the tag before a `type` value that cannot be unescaped.
fn read_attributes(
    scopes: &mut Scopes,
    depth: usize,
    start: &BytesStart<'_>,
    xsi_type: &mut Option<TypeName>,
    mo_type: &mut Option<TypeName>,
) -> Result<(), ReadError> {
    let mut bad_value = None;
    // A prefixed `type` can only be resolved once all declarations of the
    // tag are known (`xmlns:p` may follow `p:type`). There is nearly always
    // at most one; several are resolved by a second pass.
    let mut prefixed: Option<(&[u8], Cow<'_, str>)> = None;
    let mut prefixed_count = 0usize;
    for attr in start.attributes().with_checks(false) {
        let attr = attr.map_err(attribute_error)?;
        let key = attr.key.into_inner().as_bytes();
        let declared = if key == b"xmlns" {
            Some(&b""[..])
        } else {
            key.strip_prefix(b"xmlns:")
        };
        if let Some(declared) = declared {
            let uri = general_value(attr.value.clone())?;
            scopes.declare(depth, declared, uri.as_bytes());
        }
        let (attr_prefix, attr_local) = split_qname(key);
        if attr_local != b"type" || bad_value.is_some() {
            continue;
        }
        let value = match general_value(attr.value) {
            Ok(value) => value,
            Err(err) => {
                bad_value = Some(err);
                continue;
            }
        };
        if attr_prefix.is_empty() {
            // Unprefixed attributes are in no namespace: a MoRef's type.
            *mo_type = Some(TypeName::from_str_ref(&value));
        } else if attr_prefix != b"xmlns" {
            prefixed_count += 1;
            prefixed = Some((attr_prefix, value));
        }
    }
    if let Some(err) = bad_value {
        return Err(err);
    }
    let is_xsi = |prefix: &[u8]| scopes.resolve(prefix) == Some(XSI_NS.as_bytes());
    if prefixed_count > 1 {
        // The last `type` in the XSI namespace wins.
        for attr in start.attributes().with_checks(false) {
            let attr = attr.map_err(attribute_error)?;
            let (attr_prefix, attr_local) = split_qname(attr.key.into_inner().as_bytes());
            if attr_local == b"type" && !attr_prefix.is_empty() && attr_prefix != b"xmlns" {
                let value = general_value(attr.value)?;
                if is_xsi(attr_prefix) {
                    *xsi_type = Some(TypeName::from_str_ref(xsi_local(&value)));
                }
            }
        }
    } else if let Some((attr_prefix, value)) = prefixed
        && is_xsi(attr_prefix)
    {
        *xsi_type = Some(TypeName::from_str_ref(xsi_local(&value)));
    }
    Ok(())
}

/// Appends the content of a text event. Entity and character references
/// come as their own events ([`push_reference`]).
fn push_text(out: &mut String, text: &str) {
    if out.is_empty() {
        // Most elements have one text event: one allocation of the exact size.
        *out = text.to_owned();
    } else {
        out.push_str(text);
    }
}

/// Appends what an entity or character reference (`&amp;`, `&#x41;`)
/// stands for. Only the five predefined entities exist in a SOAP answer: an
/// answer cannot declare its own (no DTD is read).
fn push_reference(out: &mut String, reference: &BytesRef<'_>) -> Result<(), ReadError> {
    if let Some(ch) = reference.resolve_char_ref().map_err(attribute_error)? {
        out.push(ch);
        return Ok(());
    }
    let name: &str = reference;
    match quick_xml::escape::resolve_predefined_entity(name) {
        Some(value) => {
            out.push_str(value);
            Ok(())
        }
        None => Err(ReadError::Malformed(format!(
            "unrecognized entity `{}`",
            name.escape_debug()
        ))),
    }
}

/// An element whose end tag has not been read yet, and where its children
/// start in the shared stack of finished elements.
struct Open {
    node: Node,
    first_child: usize,
}

/// Parses a whole XML document into its root element and the root's
/// namespace URI.
///
/// # Errors
/// [`ReadError`] when the bytes are not well-formed XML, nest too deep or hold
/// no element.
pub fn parse_document(bytes: &[u8]) -> Result<(Node, Option<String>), ReadError> {
    let mut reader = Reader::from_reader(bytes);
    reader.config_mut().trim_text(false);
    reader.config_mut().check_end_names = true;
    let mut scopes = Scopes::default();
    // Open elements that have children, and the finished children of all of
    // them in one shared stack: each element gets its children in one
    // exactly sized vector when it closes, instead of growing one vector per
    // element.
    let mut open: Vec<Open> = Vec::with_capacity(16);
    let mut done: Vec<Node> = Vec::with_capacity(64);
    // Whether the last node in `done` is the innermost open element, still
    // without a child. Most elements are such leaves: they are written once,
    // where they stay, and only move to `open` when a child shows up.
    let mut in_leaf = false;
    let mut root_ns: Option<String> = None;
    let mut root: Option<Node> = None;
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => return Err(ReadError::Malformed(e.to_string())),
        };
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                if root.is_some() {
                    return Err(ReadError::Malformed(
                        "content after the root element".into(),
                    ));
                }
                // The innermost element gets a child: it is a leaf no more.
                if in_leaf && let Some(parent) = done.pop() {
                    open.push(Open {
                        node: parent,
                        first_child: done.len(),
                    });
                }
                let depth = open.len();
                let is_empty = matches!(event, Event::Empty(_));
                if !is_empty && depth >= MAX_DEPTH {
                    return Err(ReadError::TooDeep);
                }
                let ns = open_node(&mut scopes, depth, start, &mut done)?;
                if depth == 0 {
                    root_ns = ns;
                }
                if is_empty {
                    scopes.leave(depth);
                    if depth == 0 {
                        root = done.pop();
                    }
                }
                in_leaf = !is_empty;
            }
            Event::End(_) => {
                if in_leaf {
                    in_leaf = false;
                    scopes.leave(open.len());
                    if open.is_empty() {
                        root = done.pop();
                    }
                } else {
                    let Some(Open {
                        mut node,
                        first_child,
                    }) = open.pop()
                    else {
                        return Err(ReadError::Malformed("unbalanced end tag".into()));
                    };
                    node.children = done.drain(first_child..).collect();
                    scopes.leave(open.len());
                    if open.is_empty() {
                        root = Some(node);
                    } else {
                        done.push(node);
                    }
                }
            }
            Event::Text(text) => {
                let node = if in_leaf {
                    done.last_mut()
                } else {
                    open.last_mut().map(|o| &mut o.node)
                };
                match node {
                    Some(node) => push_text(&mut node.text, &text),
                    None => {
                        if !text.bytes().all(|b| b.is_ascii_whitespace()) {
                            return Err(ReadError::Malformed(
                                "text outside the root element".into(),
                            ));
                        }
                    }
                }
            }
            Event::CData(data) => {
                let node = if in_leaf {
                    done.last_mut()
                } else {
                    open.last_mut().map(|o| &mut o.node)
                };
                let node = node
                    .ok_or_else(|| ReadError::Malformed("CDATA outside the root element".into()))?;
                node.text.push_str(&data);
            }
            Event::GeneralRef(reference) => {
                let node = if in_leaf {
                    done.last_mut()
                } else {
                    open.last_mut().map(|o| &mut o.node)
                };
                let node = node
                    .ok_or_else(|| ReadError::Malformed("text outside the root element".into()))?;
                push_reference(&mut node.text, &reference)?;
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if in_leaf || !open.is_empty() {
        return Err(ReadError::Malformed("unexpected end of document".into()));
    }
    let root = root.ok_or_else(|| ReadError::Malformed("no root element".into()))?;
    Ok((root, root_ns))
}
/// A decoded response: either the body's payload element or a fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The `…Response` element.
    Ok(Node),
    /// A SOAP fault.
    Fault(Fault),
}

/// Reads a SOAP response envelope.
///
/// # Errors
/// [`ReadError`] when the bytes are not a SOAP envelope with a body.
pub fn read_response(bytes: &[u8]) -> Result<Response, ReadError> {
    let (envelope, ns) = parse_document(bytes)?;
    if envelope.name != "Envelope" || ns.as_deref() != Some(SOAP_ENV_NS) {
        return Err(ReadError::NotSoap(format!(
            "root element is {:?}, not a SOAP 1.1 Envelope",
            envelope.name
        )));
    }
    let body = envelope
        .children
        .into_iter()
        .find(|c| c.name == "Body")
        .ok_or_else(|| ReadError::NotSoap("the envelope has no Body".into()))?;
    let payload = body
        .children
        .into_iter()
        .next()
        .ok_or_else(|| ReadError::NotSoap("the Body is empty".into()))?;
    if payload.name == "Fault" {
        return Ok(Response::Fault(decode_fault(&payload)));
    }
    Ok(Response::Ok(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><R xmlns="urn:vim25"><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:int">3</val><other xmlns:q="urn:other" q:type="Nope" type="Folder">group-d1 &amp; x</other></R></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn resolves_the_xsi_prefix_instead_of_matching_it() {
        let Response::Ok(node) = read_response(TYPED.as_bytes()).unwrap() else {
            panic!("fault")
        };
        assert_eq!(node.name, "R");
        let val = node.child("val").unwrap();
        assert_eq!(val.xsi_type.as_deref(), Some("int"));
        assert_eq!(val.text, "3");
        let other = node.child("other").unwrap();
        assert_eq!(
            other.xsi_type, None,
            "a type attribute in another namespace"
        );
        assert_eq!(other.mo_type.as_deref(), Some("Folder"));
        assert_eq!(other.text, "group-d1 & x");
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        assert!(matches!(
            read_response(b"<Envelope><Body><x/></Body></Envelope>"),
            Err(ReadError::NotSoap(_))
        ));
        assert!(matches!(
            read_response(b"<a><b></a>"),
            Err(ReadError::Malformed(_))
        ));
        assert!(read_response(b"").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert_eq!(read_response(deep.as_bytes()), Err(ReadError::TooDeep));
    }

    #[test]
    fn type_attributes_resolve_whatever_their_order() {
        let xml = concat!(
            r#"<r xmlns:a="http://www.w3.org/2001/XMLSchema-instance">"#,
            // Declared after its use; the last type in the XSI namespace wins.
            r#"<e b:type="B" a:type="A" xmlns:b="http://www.w3.org/2001/XMLSchema-instance"/>"#,
            r#"<f a:type="x:F" b:type="B" xmlns:b="urn:other">t</f>"#,
            r#"<g c:type="xsd:long" xmlns:c="http://www.w3.org/2001/XMLSchema-instance" "#,
            r#"type="HostSystem"><h type="SomethingNew">1</h></g></r>"#
        );
        let (root, _) = parse_document(xml.as_bytes()).unwrap();
        let types: Vec<_> = root
            .children
            .iter()
            .map(|c| (c.xsi_type.as_deref(), c.mo_type.as_deref()))
            .collect();
        assert_eq!(
            types,
            [
                (Some("A"), None),
                (Some("F"), None),
                (Some("long"), Some("HostSystem"))
            ]
        );
        let unknown = root.path("g.h").unwrap().mo_type.clone().unwrap();
        assert_eq!(unknown, "SomethingNew");
        assert_eq!(
            format!("{unknown} {unknown:?}"),
            r#"SomethingNew "SomethingNew""#
        );
        assert_eq!(TypeName::from("VirtualDisk".to_owned()), *"VirtualDisk");
        assert_eq!(String::from(unknown), "SomethingNew");
    }

    #[test]
    fn text_is_unescaped_and_joined() {
        let (root, _) =
            parse_document(b"<a>x &amp; <![CDATA[<y>]]> z<!-- c --> &#x41;<b>1</b><c/><d></d></a>")
                .unwrap();
        assert_eq!(root.text, "x & <y> z A");
        assert_eq!(root.child_text("b"), Some("1"));
        assert_eq!(root.child_text("c"), Some(""));
        assert_eq!(root.child_text("d"), Some(""));
        assert!(matches!(
            parse_document(b"<a>x &bogus; y</a>"),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse_document(b"<a>\xff</a>"),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse_document(b"<a><b>1</b>"),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse_document(b"<a/><b/>"),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn references_resolve_in_leaves_and_parents_and_nowhere_else() {
        // Leaves and elements with children keep their text in different
        // places while reading; both get the references resolved.
        let (root, _) = parse_document(b"<a>&lt;<b>&quot;&apos;&#65;&#x42;</b>&gt;</a>").unwrap();
        assert_eq!(root.text, "<>");
        assert_eq!(root.child_text("b"), Some("\"'AB"));
        for bad in [
            &b"&amp;<a/>"[..],
            b"<a/>&amp;",
            b"<a>&#0;</a>",
            b"<a>&#xD800;</a>",
            b"<a>&#xZZ;</a>",
            b"<a>& b</a>",
        ] {
            assert!(
                matches!(parse_document(bad), Err(ReadError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn depth_limit_counts_open_elements() {
        let nested = |depth: usize, inner: &str| {
            format!("{}{inner}{}", "<a>".repeat(depth), "</a>".repeat(depth))
        };
        let (mut node, _) = parse_document(nested(MAX_DEPTH, "<b/>").as_bytes()).unwrap();
        for _ in 1..MAX_DEPTH {
            node = node.children.into_iter().next().unwrap();
        }
        assert_eq!(node.children[0].name, "b");
        assert_eq!(
            parse_document(nested(MAX_DEPTH, "<b></b>").as_bytes()),
            Err(ReadError::TooDeep)
        );
    }

    #[test]
    fn plain_attributes_cut_where_the_general_reader_cuts() {
        let cases = [
            r#" a="1" b='2'"#,
            r#" a="1"b="x&amp;y""#,
            " \t\na=\"\"\r",
            r#" a"b="c""#,
            r#" xmlns:p="urn:x" p:type="T" type="M" "#,
            r#" a = "1""#,
            r#" a"#,
            r#" a="1"#,
            r#" a=1"#,
            r#" ="1""#,
            r#" v="1" w="2" x="3" y="4" z="5""#,
        ];
        let mut plain_count = 0;
        for raw in cases {
            let tag = format!("e{raw}");
            let start = BytesStart::from_content(tag.as_str(), 1);
            let general: Result<Vec<(Vec<u8>, Vec<u8>)>, _> = start
                .attributes()
                .with_checks(false)
                .map(|a| {
                    a.map(|a| {
                        (
                            a.key.into_inner().as_bytes().to_vec(),
                            a.value.as_bytes().to_vec(),
                        )
                    })
                })
                .collect();
            if let Some(plain) = plain_attributes(raw) {
                plain_count += 1;
                let plain: Vec<_> = plain
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.as_bytes().to_vec()))
                    .collect();
                assert_eq!(general.ok(), Some(plain), "{raw:?}");
            }
        }
        assert_eq!(plain_count, 5, "the well-formed cases take the plain path");
    }

    #[test]
    fn many_declarations_in_scope_keep_reading_linear() {
        // Thousands of prefixes declared on the root, then thousands of
        // elements typed through the outermost one: a scan of the
        // declarations per element would take minutes here.
        let n = 100_000;
        let mut xml = String::from(r#"<r xmlns:first="http://www.w3.org/2001/XMLSchema-instance""#);
        for i in 0..n {
            xml.push_str(&format!(r#" xmlns:p{i}="urn:x{i}""#));
        }
        xml.push('>');
        for _ in 0..n {
            xml.push_str(r#"<v first:type="xsd:int">1</v>"#);
        }
        xml.push_str("</r>");
        let started = std::time::Instant::now();
        let (root, _) = parse_document(xml.as_bytes()).unwrap();
        let took = started.elapsed();
        assert_eq!(root.children.len(), n);
        assert_eq!(root.children[n - 1].xsi_type.as_deref(), Some("int"));
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn an_inner_declaration_shadows_and_then_restores_the_outer_one() {
        let xml = concat!(
            r#"<r xmlns:a="http://www.w3.org/2001/XMLSchema-instance">"#,
            r#"<s xmlns:a="urn:other"><t a:type="Inner"/></s>"#,
            r#"<u a:type="Outer"/></r>"#
        );
        let (root, _) = parse_document(xml.as_bytes()).unwrap();
        assert_eq!(root.path("s.t").unwrap().xsi_type, None);
        assert_eq!(root.child("u").unwrap().xsi_type.as_deref(), Some("Outer"));
    }
}
