//! One function per vim25 call the adapter makes. Each writes its request in
//! the element order of the vim25 schema and decodes the answer into
//! [`crate::types`].

use std::time::Duration;

use dvmm_core::ports::VsphereError;

use crate::session::{Session, this};
use crate::soap::{Envelope, Node};
use crate::types::{Device, MoRef, ObjectContent, object_contents, object_contents_owned};

fn protocol(method: &str, what: &str) -> VsphereError {
    VsphereError::Protocol {
        message: format!("{method} answered without {what}"),
    }
}

fn returned_moref(method: &str, node: &Node) -> Result<MoRef, VsphereError> {
    node.child("returnval")
        .and_then(MoRef::from_node)
        .ok_or_else(|| protocol(method, "a managed object reference"))
}

/// Writes a `PropertyFilterSpec` body (`propSet` then `objectSet`).
fn filter_spec(env: &mut Envelope, kind: &str, paths: &[&str], objects: &[MoRef]) {
    env.open("propSet").text("type", kind);
    for path in paths {
        env.text("pathSet", path);
    }
    env.close("propSet");
    for obj in objects {
        env.open("objectSet")
            .moref("obj", &obj.kind, &obj.value)
            .close("objectSet");
    }
}

/// `PropertyCollector.RetrievePropertiesEx` of `paths` on `objects` (all of
/// type `kind`). Read-only, so retried on transient failures.
///
/// # Errors
/// Faults and transport errors.
pub async fn retrieve_properties(
    session: &Session,
    kind: &str,
    paths: &[&str],
    objects: &[MoRef],
) -> Result<Vec<ObjectContent>, VsphereError> {
    let node = session
        .call("RetrievePropertiesEx", true, Duration::ZERO, |sc, env| {
            this(env, &sc.property_collector);
            env.open("specSet");
            filter_spec(env, kind, paths, objects);
            env.close("specSet").open("options").close("options");
        })
        .await?;
    Ok(object_contents_owned(node))
}

/// `RetrievePropertiesEx` of the `name` of every VM below `folder`
/// (recursively through sub-folders): finds a VM or template by name.
///
/// # Errors
/// Faults and transport errors.
pub async fn find_vms_named_below(
    session: &Session,
    folder: &MoRef,
    name: &str,
) -> Result<Vec<MoRef>, VsphereError> {
    Ok(vm_names_below(session, folder, None)
        .await?
        .into_iter()
        .filter(|(_, found)| found == name)
        .map(|(vm, _)| vm)
        .collect())
}

/// The reference and `name` of every VM and template below `folder`
/// (recursively through sub-folders), following `ContinueRetrievePropertiesEx`
/// when the server pages the answer (at most
/// [`SoapOptions::max_continuation_pages`](crate::SoapOptions::max_continuation_pages)
/// pages). `page_size` asks for pages of at most
/// that many objects (`maxObjects`); `None` leaves it to the server.
///
/// # Errors
/// Faults and transport errors.
pub async fn vm_names_below(
    session: &Session,
    folder: &MoRef,
    page_size: Option<u32>,
) -> Result<Vec<(MoRef, String)>, VsphereError> {
    let page_size = page_size.map(|n| n.to_string());
    let mut node = session
        .call("RetrievePropertiesEx", true, Duration::ZERO, |sc, env| {
            this(env, &sc.property_collector);
            env.open("specSet")
                .open("propSet")
                .text("type", "VirtualMachine")
                .text("pathSet", "name")
                .close("propSet")
                .open("objectSet")
                .moref("obj", &folder.kind, &folder.value)
                .text("skip", "true")
                .open_typed("selectSet", "TraversalSpec")
                .text("name", "folderTree")
                .text("type", "Folder")
                .text("path", "childEntity")
                .text("skip", "false")
                .open("selectSet")
                .text("name", "folderTree")
                .close("selectSet")
                .close("selectSet")
                .close("objectSet")
                .close("specSet")
                .open("options");
            if let Some(n) = &page_size {
                env.text("maxObjects", n);
            }
            env.close("options");
        })
        .await?;
    let mut found = Vec::new();
    let mut pages = 0u32;
    loop {
        let token = node
            .child("returnval")
            .and_then(|r| r.child("token"))
            .map(|t| t.text.clone())
            .filter(|t| !t.is_empty());
        found.extend(object_contents(&node).into_iter().filter_map(|o| {
            let name = o.prop("name").map(|n| n.text.clone())?;
            Some((o.obj?, name))
        }));
        let Some(token) = token else { break };
        pages += 1;
        if pages > session.options().max_continuation_pages {
            // A server that never stops paging must not grow the result
            // without end.
            return Err(VsphereError::Protocol {
                message: format!(
                    "RetrievePropertiesEx answered more than {} continuation pages",
                    session.options().max_continuation_pages
                ),
            });
        }
        // The continuation answers with the same `returnval` shape.
        node = session
            .call(
                "ContinueRetrievePropertiesEx",
                true,
                Duration::ZERO,
                |sc, env| {
                    this(env, &sc.property_collector);
                    env.text("token", &token);
                },
            )
            .await?;
    }
    Ok(found)
}

/// `SearchIndex.FindByInventoryPath`: `None` when nothing is there.
///
/// # Errors
/// Faults and transport errors.
pub async fn find_by_inventory_path(
    session: &Session,
    path: &str,
) -> Result<Option<MoRef>, VsphereError> {
    let node = session
        .call("FindByInventoryPath", true, Duration::ZERO, |sc, env| {
            this(env, &sc.search_index);
            env.text("inventoryPath", path);
        })
        .await?;
    Ok(node.child("returnval").and_then(MoRef::from_node))
}

/// `Folder.CreateFolder`. `DuplicateName` when it already exists.
///
/// # Errors
/// Faults and transport errors.
pub async fn create_folder(
    session: &Session,
    parent: &MoRef,
    name: &str,
) -> Result<MoRef, VsphereError> {
    let node = session
        .call("CreateFolder", false, Duration::ZERO, |_, env| {
            this(env, parent);
            env.text("name", name);
        })
        .await?;
    returned_moref("CreateFolder", &node)
}

/// A `VirtualMachineConfigSpec` with the parts the adapter sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpec {
    /// `numCPUs`.
    pub num_cpus: Option<u32>,
    /// `memoryMB`.
    pub memory_mb: Option<u64>,
    /// `deviceChange` entries: operation (`edit`, `add`, …) and device.
    pub device_changes: Vec<(&'static str, Device)>,
    /// `extraConfig` key/value pairs.
    pub extra_config: Vec<(String, String)>,
}

impl ConfigSpec {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.num_cpus.is_none()
            && self.memory_mb.is_none()
            && self.device_changes.is_empty()
            && self.extra_config.is_empty()
    }

    /// Writes the spec's content (without the enclosing element).
    pub fn write(&self, env: &mut Envelope) {
        if let Some(cpus) = self.num_cpus {
            env.text("numCPUs", &cpus.to_string());
        }
        if let Some(mb) = self.memory_mb {
            env.text("memoryMB", &mb.to_string());
        }
        for (op, device) in &self.device_changes {
            env.open("deviceChange").text("operation", op);
            env.node_as("device", &device.0);
            env.close("deviceChange");
        }
        for (key, value) in &self.extra_config {
            env.open("extraConfig")
                .text("key", key)
                .typed_text("value", "xsd:string", value)
                .close("extraConfig");
        }
    }
}

/// Where and how to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneSpec {
    /// Target datastore.
    pub datastore: MoRef,
    /// Target resource pool.
    pub pool: MoRef,
    /// Configuration applied while cloning.
    pub config: ConfigSpec,
}

/// Writes the whole `CloneVM_Task` request (also used by the benchmarks).
pub fn write_clone(
    env: &mut Envelope,
    template: &MoRef,
    folder: &MoRef,
    name: &str,
    spec: &CloneSpec,
) {
    this(env, template);
    env.moref("folder", &folder.kind, &folder.value)
        .text("name", name)
        .open("spec")
        .open("location")
        .moref("datastore", &spec.datastore.kind, &spec.datastore.value)
        .moref("pool", &spec.pool.kind, &spec.pool.value)
        .close("location")
        .text("template", "false")
        .open("config");
    spec.config.write(env);
    env.close("config").text("powerOn", "false").close("spec");
}

/// `VirtualMachine.CloneVM_Task`, powered off. Never retried here: a lost
/// answer may still have created the VM (the adapter checks first).
///
/// # Errors
/// Faults and transport errors.
pub async fn clone_vm(
    session: &Session,
    template: &MoRef,
    folder: &MoRef,
    name: &str,
    spec: &CloneSpec,
) -> Result<MoRef, VsphereError> {
    let node = session
        .call("CloneVM_Task", false, Duration::ZERO, |_, env| {
            write_clone(env, template, folder, name, spec);
        })
        .await?;
    returned_moref("CloneVM_Task", &node)
}

/// `VirtualMachine.ReconfigVM_Task`. The spec holds absolute values, so a
/// retry after a lost answer does no harm.
///
/// # Errors
/// Faults and transport errors.
pub async fn reconfig_vm(
    session: &Session,
    vm: &MoRef,
    spec: &ConfigSpec,
) -> Result<MoRef, VsphereError> {
    let node = session
        .call("ReconfigVM_Task", true, Duration::ZERO, |_, env| {
            this(env, vm);
            env.open("spec");
            spec.write(env);
            env.close("spec");
        })
        .await?;
    returned_moref("ReconfigVM_Task", &node)
}

/// `VirtualMachine.CustomizeVM_Task` with `CustomizationLinuxPrep`, a fixed
/// hostname and DHCP on each of `nics` adapters.
///
/// # Errors
/// Faults and transport errors.
pub async fn customize_vm(
    session: &Session,
    vm: &MoRef,
    hostname: &str,
    domain: &str,
    nics: usize,
) -> Result<MoRef, VsphereError> {
    let node = session
        .call("CustomizeVM_Task", true, Duration::ZERO, |_, env| {
            this(env, vm);
            write_customization(env, hostname, domain, nics);
        })
        .await?;
    returned_moref("CustomizeVM_Task", &node)
}

/// Writes a `spec` element of type `CustomizationSpec`.
pub fn write_customization(env: &mut Envelope, hostname: &str, domain: &str, nics: usize) {
    env.open("spec")
        .open_typed("identity", "CustomizationLinuxPrep")
        .open_typed("hostName", "CustomizationFixedName")
        .text("name", hostname)
        .close("hostName")
        .text("domain", domain)
        .close("identity")
        .open("globalIPSettings")
        .close("globalIPSettings");
    for _ in 0..nics.max(1) {
        env.open("nicSettingMap")
            .open("adapter")
            .open_typed("ip", "CustomizationDhcpIpGenerator")
            .close("ip")
            .close("adapter")
            .close("nicSettingMap");
    }
    env.close("spec");
}

/// `VirtualMachine.PowerOnVM_Task`.
///
/// # Errors
/// Faults and transport errors.
pub async fn power_on_vm(session: &Session, vm: &MoRef) -> Result<MoRef, VsphereError> {
    let node = session
        .call("PowerOnVM_Task", false, Duration::ZERO, |_, env| {
            this(env, vm);
        })
        .await?;
    returned_moref("PowerOnVM_Task", &node)
}

/// `VirtualMachine.PowerOffVM_Task` (a hard power-off). Not repeated by
/// the client: a lost answer may hide a power-off that happened.
///
/// # Errors
/// Faults and transport errors.
pub async fn power_off_vm(session: &Session, vm: &MoRef) -> Result<MoRef, VsphereError> {
    let node = session
        .call("PowerOffVM_Task", false, Duration::ZERO, |_, env| {
            this(env, vm);
        })
        .await?;
    returned_moref("PowerOffVM_Task", &node)
}

/// `VirtualMachine.ShutdownGuest`: asks the guest OS to shut down and
/// returns at once (no task); the VM is off when its `runtime.powerState`
/// says so.
///
/// # Errors
/// Faults (`ToolsUnavailable` when VMware Tools is not running,
/// `InvalidPowerState` when the VM is not on) and transport errors.
pub async fn shutdown_guest(session: &Session, vm: &MoRef) -> Result<(), VsphereError> {
    session
        .call("ShutdownGuest", false, Duration::ZERO, |_, env| {
            this(env, vm);
        })
        .await?;
    Ok(())
}

/// `ManagedEntity.Destroy_Task` on a VM: removes it from the inventory and
/// deletes its files.
///
/// # Errors
/// Faults and transport errors.
pub async fn destroy(session: &Session, entity: &MoRef) -> Result<MoRef, VsphereError> {
    let node = session
        .call("Destroy_Task", false, Duration::ZERO, |_, env| {
            this(env, entity);
        })
        .await?;
    returned_moref("Destroy_Task", &node)
}

/// `PropertyCollector.CreatePropertyCollector`: a private collector.
///
/// # Errors
/// Faults and transport errors.
pub async fn create_property_collector(session: &Session) -> Result<MoRef, VsphereError> {
    let node = session
        .call(
            "CreatePropertyCollector",
            true,
            Duration::ZERO,
            |sc, env| {
                this(env, &sc.property_collector);
            },
        )
        .await?;
    returned_moref("CreatePropertyCollector", &node)
}

/// `PropertyCollector.CreateFilter` on one object.
///
/// # Errors
/// Faults and transport errors.
pub async fn create_filter(
    session: &Session,
    collector: &MoRef,
    obj: &MoRef,
    paths: &[&str],
) -> Result<MoRef, VsphereError> {
    let node = session
        .call("CreateFilter", false, Duration::ZERO, |_, env| {
            this(env, collector);
            env.open("spec");
            filter_spec(env, &obj.kind, paths, std::slice::from_ref(obj));
            env.close("spec").text("partialUpdates", "false");
        })
        .await?;
    returned_moref("CreateFilter", &node)
}

/// One property change of an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The object.
    pub obj: MoRef,
    /// Property path.
    pub path: String,
    /// New value; `None` when removed or unset.
    pub val: Option<Node>,
}

/// A decoded `UpdateSet`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateSet {
    /// The version to pass to the next wait.
    pub version: Option<String>,
    /// Changes in order.
    pub changes: Vec<Change>,
}

/// Decodes a `WaitForUpdatesExResponse`.
pub fn decode_updates(node: &Node) -> UpdateSet {
    let Some(set) = node.child("returnval") else {
        return UpdateSet::default();
    };
    let mut out = UpdateSet {
        version: set.child_text("version").map(str::to_owned),
        changes: Vec::new(),
    };
    for filter in set.children_named("filterSet") {
        for object in filter.children_named("objectSet") {
            let Some(obj) = object.child("obj").and_then(MoRef::from_node) else {
                continue;
            };
            for change in object.children_named("changeSet") {
                let Some(path) = change.child_text("name") else {
                    continue;
                };
                let removed = matches!(
                    change.child_text("op"),
                    Some("remove") | Some("indirectRemove")
                );
                out.changes.push(Change {
                    obj: obj.clone(),
                    path: path.to_owned(),
                    val: if removed {
                        None
                    } else {
                        change.child("val").cloned()
                    },
                });
            }
        }
    }
    out
}

/// `PropertyCollector.WaitForUpdatesEx`, waiting at most `max_wait_seconds`
/// on the server. An empty version asks for the current state at once.
///
/// # Errors
/// Faults and transport errors.
pub async fn wait_for_updates(
    session: &Session,
    collector: &MoRef,
    version: &str,
    max_wait_seconds: u32,
) -> Result<UpdateSet, VsphereError> {
    let node = session
        .call(
            "WaitForUpdatesEx",
            true,
            Duration::from_secs(u64::from(max_wait_seconds)),
            |_, env| {
                this(env, collector);
                env.text("version", version)
                    .open("options")
                    .text("maxWaitSeconds", &max_wait_seconds.to_string())
                    .close("options");
            },
        )
        .await?;
    Ok(decode_updates(&node))
}

/// `PropertyCollector.DestroyPropertyCollector` (destroys its filters).
///
/// # Errors
/// Faults and transport errors.
pub async fn destroy_property_collector(
    session: &Session,
    collector: &MoRef,
) -> Result<(), VsphereError> {
    session
        .call(
            "DestroyPropertyCollector",
            false,
            Duration::ZERO,
            |_, env| {
                this(env, collector);
            },
        )
        .await
        .map(|_| ())
}

/// The guest-customization event types, by their vim25 names: the start,
/// the success and `CustomizationFailed` with every subtype (listed one by
/// one, since a server may match `eventTypeId` on the concrete type only).
pub const CUSTOMIZATION_EVENT_TYPES: &[&str] = &[
    "CustomizationStartedEvent",
    "CustomizationSucceeded",
    "CustomizationFailed",
    "CustomizationIdentitySetupFailed",
    "CustomizationLinuxIdentityFailed",
    "CustomizationNetworkSetupFailed",
    "CustomizationSysprepFailed",
    "CustomizationUnknownFailure",
];

/// Writes an `EventFilterSpec` (in schema order): the events of `types` on
/// `entity` itself (not its children) or on every entity when `None`,
/// created at or after `begin_time` (`xsd:dateTime`) when given, at most
/// `max_count` of them when given.
fn event_filter(
    env: &mut Envelope,
    entity: Option<&MoRef>,
    types: &[&str],
    begin_time: Option<&str>,
    max_count: Option<u32>,
) {
    if let Some(entity) = entity {
        env.open("entity")
            .moref("entity", &entity.kind, &entity.value)
            .text("recursion", "self")
            .close("entity");
    }
    if let Some(begin) = begin_time {
        env.open("time").text("beginTime", begin).close("time");
    }
    for ty in types {
        env.text("eventTypeId", ty);
    }
    if let Some(max) = max_count {
        env.text("maxCount", &max.to_string());
    }
}

fn event_manager(sc: &crate::types::ServiceContent) -> MoRef {
    // Sent even when the server named none, so its fault says what is wrong.
    sc.event_manager
        .clone()
        .unwrap_or_else(|| MoRef::new("EventManager", "EventManager"))
}

/// `EventManager.CreateCollectorForEvents`: an `EventHistoryCollector` of
/// the events of `types` on `entity` itself, or on every entity when
/// `None`, whose `latestPage` holds up to `page_size` events (`maxCount`,
/// which vCenter 6.5+ and vcsim take as the page size; a server that
/// ignores it keeps its default of 10). Its `latestPage` property is what a
/// property filter watches.
///
/// Never followed by `DestroyCollector` in this crate: vcsim 0.24 deadlocks
/// when a collector is destroyed while any event is being posted (see
/// [`crate::events`]); vCenter destroys a collector with its session.
///
/// # Errors
/// Faults and transport errors.
pub async fn create_event_collector(
    session: &Session,
    entity: Option<&MoRef>,
    types: &[&str],
    page_size: Option<u32>,
) -> Result<MoRef, VsphereError> {
    let node = session
        .call(
            "CreateCollectorForEvents",
            true,
            Duration::ZERO,
            |sc, env| {
                this(env, &event_manager(sc));
                env.open("filter");
                event_filter(env, entity, types, None, page_size);
                env.close("filter");
            },
        )
        .await?;
    returned_moref("CreateCollectorForEvents", &node)
}

/// `EventManager.QueryEvents`: the events of `types` on `entity` itself,
/// created at or after `begin_time` (`xsd:dateTime`) when given, as the
/// server returns them (`Event` nodes). One read, no collector left behind.
///
/// # Errors
/// Faults and transport errors.
pub async fn query_events(
    session: &Session,
    entity: &MoRef,
    types: &[&str],
    begin_time: Option<&str>,
) -> Result<Vec<Node>, VsphereError> {
    let node = session
        .call("QueryEvents", true, Duration::ZERO, |sc, env| {
            this(env, &event_manager(sc));
            env.open("filter");
            event_filter(env, Some(entity), types, begin_time, None);
            env.close("filter");
        })
        .await?;
    Ok(node
        .children
        .into_iter()
        .filter(|n| n.name == "returnval")
        .collect())
}

/// `PropertyCollector.CancelWaitForUpdates`: the collector's
/// `WaitForUpdatesEx` in progress returns now (with what it has, or the
/// fault `RequestCanceled`).
///
/// # Errors
/// Faults and transport errors.
pub async fn cancel_wait_for_updates(
    session: &Session,
    collector: &MoRef,
) -> Result<(), VsphereError> {
    session
        .call("CancelWaitForUpdates", true, Duration::ZERO, |_, env| {
            this(env, collector);
        })
        .await
        .map(|_| ())
}

/// `EventManager.PostEvent` of an event of type `event_type` about `vm`
/// (named `vm_name`), with `reason` for a `CustomizationFailed`. vCenter
/// does not post customization events for a client; this is how tests and
/// benchmarks play a customizing guest on vcsim.
///
/// # Errors
/// Faults and transport errors.
pub async fn post_vm_event(
    session: &Session,
    vm: &MoRef,
    vm_name: &str,
    event_type: &str,
    reason: Option<&str>,
) -> Result<(), VsphereError> {
    session
        .call("PostEvent", false, Duration::ZERO, |sc, env| {
            this(env, &event_manager(sc));
            // Key, chain and time are the server's to set.
            env.open_typed("eventToPost", event_type)
                .text("key", "0")
                .text("chainId", "0")
                .text("createdTime", "1970-01-01T00:00:00Z")
                .text("userName", "")
                .open("vm")
                .text("name", vm_name)
                .moref("vm", &vm.kind, &vm.value)
                .close("vm")
                .text(
                    "fullFormattedMessage",
                    reason.unwrap_or("guest customization event"),
                );
            if let Some(reason) = reason {
                env.text("reason", reason);
            }
            env.close("eventToPost");
        })
        .await
        .map(|_| ())
}
