//! The SOAP layer: the envelope writer, a namespace-aware response reader and
//! fault decoding.
//!
//! Responses are read into a small element tree ([`Node`]). vim25 types its
//! values with `xsi:type`, but the prefix that stands for the
//! `XMLSchema-instance` namespace varies (vCenter and vcsim declare a local
//! `XMLSchema-instance` prefix on property values and use `xsi` on faults),
//! so the reader resolves prefixes instead of matching them literally.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use dvmm_core::ports::VsphereError;
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

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
    pub xsi_type: Option<String>,
    /// The unqualified `type` attribute, as on a managed object reference.
    pub mo_type: Option<String>,
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

fn local_name(qname: &[u8]) -> &[u8] {
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

/// FNV-1a: names are short, and SipHash would cost more than the allocation
/// it saves.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type NameTable = HashMap<&'static [u8], &'static str, BuildHasherDefault<Fnv>>;

fn element_name(local: &[u8]) -> Result<Cow<'static, str>, ReadError> {
    static TABLE: OnceLock<NameTable> = OnceLock::new();
    let table = TABLE.get_or_init(|| KNOWN_NAMES.iter().map(|n| (n.as_bytes(), *n)).collect());
    match table.get(local) {
        Some(name) => Ok(Cow::Borrowed(name)),
        None => Ok(Cow::Owned(utf8(local)?.to_owned())),
    }
}

/// In-scope namespace declarations: (element depth, prefix, URI). Only
/// elements that declare namespaces touch it, so plain vim25 payloads pay
/// nothing for resolution.
#[derive(Default)]
struct Scopes {
    decls: Vec<(usize, Vec<u8>, Vec<u8>)>,
}

impl Scopes {
    fn resolve(&self, prefix: &[u8]) -> Option<&[u8]> {
        self.decls
            .iter()
            .rev()
            .find(|(_, p, _)| p == prefix)
            .map(|(_, _, uri)| uri.as_slice())
    }

    fn leave(&mut self, depth: usize) {
        while self.decls.last().is_some_and(|(d, _, _)| *d >= depth) {
            self.decls.pop();
        }
    }
}

fn split_qname(qname: &[u8]) -> (&[u8], &[u8]) {
    match qname.iter().position(|b| *b == b':') {
        Some(i) => (&qname[..i], &qname[i + 1..]),
        None => (&[], qname),
    }
}

/// Reads the start tag of an element at `depth`: records its namespace
/// declarations, then resolves its `type` attributes.
fn open_node(
    scopes: &mut Scopes,
    depth: usize,
    start: &BytesStart<'_>,
) -> Result<(Node, Option<String>), ReadError> {
    let qname = start.name();
    let (prefix, local) = split_qname(qname.as_ref());
    let mut node = Node::new(element_name(local)?);
    let has_attributes = start
        .attributes_raw()
        .iter()
        .any(|b| !b.is_ascii_whitespace());
    if has_attributes {
        for attr in start.attributes().with_checks(false) {
            let attr = attr.map_err(|e| ReadError::Malformed(e.to_string()))?;
            let key = attr.key.as_ref();
            let declared = if key == b"xmlns" {
                Some(&b""[..])
            } else {
                key.strip_prefix(b"xmlns:")
            };
            if let Some(declared) = declared {
                let uri = attr
                    .unescape_value()
                    .map_err(|e| ReadError::Malformed(e.to_string()))?;
                scopes
                    .decls
                    .push((depth, declared.to_vec(), uri.as_bytes().to_vec()));
            }
        }
        for attr in start.attributes().with_checks(false) {
            let attr = attr.map_err(|e| ReadError::Malformed(e.to_string()))?;
            let (attr_prefix, attr_local) = split_qname(attr.key.as_ref());
            if attr_local != b"type" {
                continue;
            }
            let value = attr
                .unescape_value()
                .map_err(|e| ReadError::Malformed(e.to_string()))?;
            if attr_prefix.is_empty() {
                // Unprefixed attributes are in no namespace: a MoRef's type.
                node.mo_type = Some(value.into_owned());
            } else if attr_prefix != b"xmlns"
                && scopes.resolve(attr_prefix) == Some(XSI_NS.as_bytes())
            {
                // `xsd:string` → `string`: the schema prefix carries no meaning here.
                let local = match value.rfind(':') {
                    Some(i) => &value[i + 1..],
                    None => &value[..],
                };
                node.xsi_type = Some(local.to_owned());
            }
        }
    }
    let ns = if depth == 0 {
        scopes
            .resolve(prefix)
            .and_then(|u| std::str::from_utf8(u).ok())
            .map(str::to_owned)
    } else {
        None
    };
    Ok((node, ns))
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
    // Open elements, and the finished children of all of them in one shared
    // stack: each element gets its children in one exactly sized vector
    // when it closes, instead of growing one vector per element.
    let mut open: Vec<Node> = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    let mut done: Vec<Node> = Vec::new();
    let mut root_ns: Option<String> = None;
    let mut root: Option<Node> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| ReadError::Malformed(e.to_string()))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(ReadError::Malformed(
                        "content after the root element".into(),
                    ));
                }
                if open.len() >= MAX_DEPTH {
                    return Err(ReadError::TooDeep);
                }
                let (node, ns) = open_node(&mut scopes, open.len(), &start)?;
                if open.is_empty() {
                    root_ns = ns;
                }
                open.push(node);
                starts.push(done.len());
            }
            Event::Empty(start) => {
                if root.is_some() {
                    return Err(ReadError::Malformed(
                        "content after the root element".into(),
                    ));
                }
                let depth = open.len();
                let (node, ns) = open_node(&mut scopes, depth, &start)?;
                scopes.leave(depth);
                if open.is_empty() {
                    root_ns = ns;
                    root = Some(node);
                } else {
                    done.push(node);
                }
            }
            Event::End(_) => {
                let (Some(mut node), Some(first)) = (open.pop(), starts.pop()) else {
                    return Err(ReadError::Malformed("unbalanced end tag".into()));
                };
                scopes.leave(open.len());
                node.children = done.drain(first..).collect();
                if open.is_empty() {
                    root = Some(node);
                } else {
                    done.push(node);
                }
            }
            Event::Text(text) => {
                if let Some(node) = open.last_mut() {
                    let text = text
                        .unescape()
                        .map_err(|e| ReadError::Malformed(e.to_string()))?;
                    node.text.push_str(&text);
                } else if !text.iter().all(u8::is_ascii_whitespace) {
                    return Err(ReadError::Malformed("text outside the root element".into()));
                }
            }
            Event::CData(data) => {
                let node = open
                    .last_mut()
                    .ok_or_else(|| ReadError::Malformed("CDATA outside the root element".into()))?;
                node.text.push_str(utf8(&data)?);
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !open.is_empty() {
        return Err(ReadError::Malformed("unexpected end of document".into()));
    }
    let root = root.ok_or_else(|| ReadError::Malformed("no root element".into()))?;
    Ok((root, root_ns))
}

/// A SOAP fault as the server sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The vim25 fault type (`NotAuthenticated`, `DuplicateName`, …), or the
    /// SOAP `faultcode` when the detail names no type.
    pub kind: String,
    /// `faultstring`, possibly empty.
    pub message: String,
    /// The fault's detail element, when present.
    pub detail: Option<Node>,
}

impl Fault {
    /// Reads a vim25 fault object (a `<fault xsi:type="…">` element or a
    /// `<…Fault>` detail element).
    pub fn from_fault_node(node: &Node, message: impl Into<String>) -> Self {
        let kind = node.xsi_type.clone().unwrap_or_else(|| {
            node.name
                .strip_suffix("Fault")
                .filter(|s| !s.is_empty())
                .unwrap_or(&node.name)
                .to_owned()
        });
        Self {
            kind,
            message: message.into(),
            detail: Some(node.clone()),
        }
    }

    /// Reads a `LocalizedMethodFault` (task `info.error`, `missingSet/fault`).
    pub fn from_localized(node: &Node) -> Self {
        let message = node.child_text("localizedMessage").unwrap_or_default();
        match node.child("fault") {
            Some(fault) => Self::from_fault_node(fault, message),
            None => Self {
                kind: node
                    .xsi_type
                    .clone()
                    .unwrap_or_else(|| "MethodFault".into()),
                message: message.to_owned(),
                detail: None,
            },
        }
    }

    fn detail_text(&self, name: &str) -> Option<&str> {
        self.detail.as_ref().and_then(|d| d.child_text(name))
    }

    fn message_or_kind(&self) -> String {
        if self.message.trim().is_empty() {
            self.kind.clone()
        } else {
            self.message.clone()
        }
    }

    /// Maps the fault onto the port's error. `username` names the user in
    /// `InvalidLogin`.
    pub fn into_error(self, username: &str) -> VsphereError {
        match self.kind.as_str() {
            "InvalidLogin" | "InvalidLoginFault" => VsphereError::InvalidLogin {
                username: username.to_owned(),
            },
            "NotAuthenticated" => VsphereError::NotAuthenticated,
            "DuplicateName" => {
                let name = self.detail_text("name").unwrap_or_default().to_owned();
                let location = self
                    .detail
                    .as_ref()
                    .and_then(|d| d.child("object"))
                    .map(|o| o.text.clone())
                    .unwrap_or_default();
                VsphereError::DuplicateName { name, location }
            }
            "ManagedObjectNotFound" => {
                let obj = self.detail.as_ref().and_then(|d| d.child("obj"));
                VsphereError::NotFound {
                    kind: obj
                        .and_then(|o| o.mo_type.clone())
                        .unwrap_or_else(|| "managed object".into()),
                    name: obj.map(|o| o.text.clone()).unwrap_or_default(),
                }
            }
            "InvalidPowerState" => {
                let mut message = self.message.clone();
                if message.trim().is_empty() || message.starts_with("*types.") {
                    let existing = self.detail_text("existingState").unwrap_or("unknown");
                    let requested = self.detail_text("requestedState").unwrap_or("another");
                    message = format!("VM is {existing}, the operation needs {requested}");
                }
                VsphereError::InvalidPowerState { message }
            }
            kind if kind.starts_with("Insufficient")
                || kind == "NotEnoughLicenses"
                || kind == "NoDiskSpace"
                || kind == "OutOfBounds" =>
            {
                VsphereError::InsufficientResources {
                    message: format!("{kind}: {}", self.message_or_kind()),
                }
            }
            _ => VsphereError::TaskFailed {
                message: self.message_or_kind(),
                fault: self.kind,
            },
        }
    }
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

/// Decodes a `soapenv:Fault` element.
pub fn decode_fault(fault: &Node) -> Fault {
    let message = fault
        .child_text("faultstring")
        .unwrap_or_default()
        .to_owned();
    match fault.child("detail").and_then(|d| d.children.first()) {
        Some(detail) => Fault::from_fault_node(detail, message),
        None => Fault {
            kind: fault
                .child_text("faultcode")
                .map(|c| local_name(c.as_bytes()))
                .and_then(|c| std::str::from_utf8(c).ok())
                .filter(|c| !c.is_empty())
                .unwrap_or("ServerFaultCode")
                .to_owned(),
            message,
            detail: None,
        },
    }
}

/// Escapes text for element content and attribute values.
pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped rather than
            // producing a document the server rejects as a whole.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
}

/// Writes one request envelope. Elements are written in call order; the
/// caller is responsible for vim25's element order.
#[derive(Debug)]
pub struct Envelope {
    buf: String,
    method: &'static str,
}

impl Envelope {
    /// Starts the request of `method` (e.g. `RetrievePropertiesEx`).
    pub fn new(method: &'static str) -> Self {
        let mut buf = String::with_capacity(512);
        buf.push_str(concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
            r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" "#,
            r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>"#
        ));
        buf.push('<');
        buf.push_str(method);
        buf.push_str(r#" xmlns="urn:vim25">"#);
        Self { buf, method }
    }

    /// The method this envelope calls.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// `<tag type="Kind">value</tag>`: a managed object reference.
    pub fn moref(&mut self, tag: &str, kind: &str, value: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} type=\"");
        escape_into(&mut self.buf, kind);
        self.buf.push_str("\">");
        escape_into(&mut self.buf, value);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// `<tag>text</tag>`.
    pub fn text(&mut self, tag: &str, text: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag}>");
        escape_into(&mut self.buf, text);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// `<tag xsi:type="ty">text</tag>`.
    pub fn typed_text(&mut self, tag: &str, ty: &str, text: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} xsi:type=\"{ty}\">");
        escape_into(&mut self.buf, text);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Opens `<tag>`.
    pub fn open(&mut self, tag: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag}>");
        self
    }

    /// Opens `<tag xsi:type="ty">`.
    pub fn open_typed(&mut self, tag: &str, ty: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} xsi:type=\"{ty}\">");
        self
    }

    /// Closes `</tag>`.
    pub fn close(&mut self, tag: &str) -> &mut Self {
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Writes an element read from a response back out, with its `xsi:type`
    /// and managed-object `type`: this is how devices are edited "as read".
    pub fn node(&mut self, node: &Node) -> &mut Self {
        self.node_as(&node.name, node)
    }

    /// Like [`Envelope::node`] under another element name.
    pub fn node_as(&mut self, tag: &str, node: &Node) -> &mut Self {
        let _ = write!(self.buf, "<{tag}");
        if let Some(ty) = &node.xsi_type {
            self.buf.push_str(" xsi:type=\"");
            escape_into(&mut self.buf, &xsi_qualified(ty));
            self.buf.push('"');
        }
        if let Some(ty) = &node.mo_type {
            self.buf.push_str(" type=\"");
            escape_into(&mut self.buf, ty);
            self.buf.push('"');
        }
        self.buf.push('>');
        if node.children.is_empty() {
            escape_into(&mut self.buf, &node.text);
        } else {
            for child in &node.children {
                self.node(child);
            }
        }
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Finishes the document.
    pub fn finish(mut self) -> String {
        let _ = write!(
            self.buf,
            "</{}></soapenv:Body></soapenv:Envelope>",
            self.method
        );
        self.buf
    }
}

/// XML Schema built-in types need the `xsd:` prefix when written back.
fn xsi_qualified(ty: &str) -> String {
    const XSD: &[&str] = &[
        "string",
        "boolean",
        "int",
        "long",
        "short",
        "byte",
        "float",
        "double",
        "dateTime",
        "base64Binary",
        "anyURI",
    ];
    if XSD.contains(&ty) {
        format!("xsd:{ty}")
    } else {
        ty.to_owned()
    }
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
    fn writer_escapes_and_round_trips_nodes() {
        let mut env = Envelope::new("Login");
        env.moref("_this", "SessionManager", "SessionManager")
            .text("userName", "a<b>&\"c'")
            .typed_text("value", "xsd:string", "v");
        let mut device = Node::new("device");
        device.xsi_type = Some("VirtualDisk".into());
        device.children.push(Node::with_text("key", "2000"));
        let mut net = Node::with_text("network", "network-7");
        net.mo_type = Some("Network".into());
        device.children.push(net);
        env.node(&device);
        let xml = env.finish();
        assert!(xml.contains("<userName>a&lt;b&gt;&amp;&quot;c&apos;</userName>"));
        let Response::Ok(login) = read_response(xml.as_bytes()).unwrap() else {
            panic!("fault")
        };
        assert_eq!(login.child_text("userName"), Some("a<b>&\"c'"));
        assert_eq!(
            login.child("value").unwrap().xsi_type.as_deref(),
            Some("string")
        );
        assert_eq!(login.child("device"), Some(&device));
    }

    #[test]
    fn faults_map_to_typed_errors() {
        let fault = |kind: &str, detail: Vec<Node>| Fault {
            kind: kind.into(),
            message: String::new(),
            detail: Some(Node {
                children: detail,
                ..Node::new("x")
            }),
        };
        assert_eq!(
            fault("InvalidLogin", vec![]).into_error("bob"),
            VsphereError::InvalidLogin {
                username: "bob".into()
            }
        );
        let mut obj = Node::with_text("obj", "vm-9");
        obj.mo_type = Some("VirtualMachine".into());
        assert_eq!(
            fault("ManagedObjectNotFound", vec![obj]).into_error("u"),
            VsphereError::NotFound {
                kind: "VirtualMachine".into(),
                name: "vm-9".into()
            }
        );
        assert!(matches!(
            fault("InsufficientMemoryResourcesFault", vec![]).into_error("u"),
            VsphereError::InsufficientResources { .. }
        ));
        assert_eq!(
            fault("InvalidDeviceSpec", vec![]).into_error("u"),
            VsphereError::TaskFailed {
                fault: "InvalidDeviceSpec".into(),
                message: "InvalidDeviceSpec".into()
            }
        );
    }
}
