//! [`SoapVsphere`]: the [`VspherePort`] implementation over vim25 SOAP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::config::VcenterEndpoint;
use dvmm_core::ids::{VmId, VmwareVmId};
use dvmm_core::ports::{
    PowerOffMode, PowerOffOutcome, ProgressReporter, ProvisioningProgress, VsphereError,
    VspherePort,
};
use dvmm_core::spec::{
    IP_TIMEOUT_WARNING, VmGuestInfo, VmProvisioningResult, VmSpec, hostname_mismatch_warning,
    join_warnings,
};
use tracing::Instrument;

use crate::customization;
use crate::methods::{self, CloneSpec, ConfigSpec};
use crate::options::SoapOptions;
use crate::session::{Connector, HttpConnector, Session, SessionPool};
use crate::types::{Hardware, MoRef, NetworkBacking, PowerState, VmProperties};
use crate::wait;

/// The extraConfig key that carries dvmm's VM id inside the vSphere VM.
pub const VM_ID_KEY: &str = "dvmm.vmId";

/// Inventory resolved once per session and reused.
#[derive(Clone, Debug)]
enum Cached {
    Ref(MoRef),
    Network(NetworkBacking),
    Template(MoRef, Hardware),
}

/// Resolved inventory of one session, keyed by what was asked, each entry
/// with the login it was learned under. It lives here, above the session,
/// because only the adapter knows what it means.
#[derive(Debug, Default)]
struct InventoryCache(Mutex<HashMap<String, (u64, Cached)>>);

impl InventoryCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Cached)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// A session with its inventory cache; reads as the session.
#[derive(Clone, Debug)]
struct Conn {
    session: Arc<Session>,
    cache: Arc<InventoryCache>,
}

impl Conn {
    /// What was resolved for `key` under the current login. An entry from
    /// an earlier login is not used: the session had to log in again, so
    /// the server may have restarted with another inventory (a folder made
    /// before is gone, and cloning into its stale reference fails).
    fn cached(&self, key: &str) -> Option<Cached> {
        let login = self.session.logins();
        match self.cache.lock().get(key) {
            Some((learned, value)) if *learned == login => Some(value.clone()),
            _ => None,
        }
    }

    fn remember(&self, key: String, value: Cached) {
        let login = self.session.logins();
        self.cache.lock().insert(key, (login, value));
    }
}

impl Deref for Conn {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.session
    }
}

/// Properties read back from a VM before deciding what to change.
const VM_CONFIG_PATHS: &[&str] = &[
    "config.hardware",
    "config.extraConfig",
    "runtime.powerState",
];

/// Properties that say whose a VM is and how far it is from off.
const OWNER_PATHS: &[&str] = &[
    "config.extraConfig",
    "runtime.powerState",
    "guest.toolsRunningStatus",
];

const POWER_PATHS: &[&str] = &["runtime.powerState"];

/// `VmGone` for a VM that a read says does not exist (vCenter answers
/// `ManagedObjectNotFound`, or a `missingSet` of it).
fn gone(id: &VmwareVmId, error: VsphereError) -> VsphereError {
    match error {
        VsphereError::NotFound { .. } => VsphereError::VmGone {
            vmware_vm_id: id.as_str().to_owned(),
        },
        other => other,
    }
}

/// The VM `id` and what [`OWNER_PATHS`] read of it, only when it carries
/// `owner` as its dvmm id: nothing may touch a VM dvmm did not create for
/// this VM.
async fn owned_vm(
    session: &Session,
    id: &VmwareVmId,
    owner: VmId,
) -> Result<(MoRef, VmProperties), VsphereError> {
    let vm = MoRef::new("VirtualMachine", id.as_str());
    let props = read_vm(session, &vm, OWNER_PATHS)
        .await
        .map_err(|e| gone(id, e))?;
    if !carries(&props, owner) {
        tracing::warn!(vm = %vm, "refusing to touch a VM that does not carry this dvmm id");
        return Err(VsphereError::NotOurs {
            vmware_vm_id: id.as_str().to_owned(),
        });
    }
    Ok((vm, props))
}

const INFO_PATHS: &[&str] = &[
    "name",
    "runtime.powerState",
    "guest.toolsRunningStatus",
    "guest.ipAddress",
    "guest.hostName",
    "guest.net",
    "config.extraConfig",
];

/// The vim25 SOAP client as a [`VspherePort`].
///
/// Cheap to construct and to clone (clones share sessions). Sessions are
/// opened lazily, one per distinct vCenter URL, user, password and TLS policy, and
/// shared by every provisioning; call [`SoapVsphere::shutdown`] to log them
/// out.
///
/// ```no_run
/// use dvmm_core::ports::VspherePort;
/// use dvmm_vsphere::{SoapOptions, SoapVsphere};
/// # async fn run(spec: dvmm_core::spec::VmSpec) -> Result<(), dvmm_core::ports::VsphereError> {
/// let vsphere = SoapVsphere::new(SoapOptions::default());
/// let result = vsphere.create_vm(&spec).await?;
/// println!("{} is at {:?}", result.vmware_vm_id, result.ip_address);
/// vsphere.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct SoapVsphere {
    inner: Arc<Inner>,
}

struct Inner {
    options: Arc<SoapOptions>,
    pool: SessionPool,
    requests: Arc<AtomicU64>,
    connector: Box<dyn Connector>,
    caches: Mutex<HashMap<u64, Arc<InventoryCache>>>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            options: Arc::default(),
            pool: SessionPool::default(),
            requests: Arc::default(),
            connector: Box::new(HttpConnector),
            caches: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoapVsphere")
            .field("options", &self.options)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl SoapVsphere {
    /// A client with these options. Nothing is connected yet.
    pub fn new(options: SoapOptions) -> Self {
        Self::with_connector(options, HttpConnector)
    }

    /// A client whose sessions send through the transports `connector`
    /// makes (e.g. a [`ScriptedTransport`](crate::transport::scripted::ScriptedTransport)
    /// in tests); the session, retry and breaker layers stay the same.
    pub fn with_connector(options: SoapOptions, connector: impl Connector + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                options: Arc::new(options),
                connector: Box::new(connector),
                ..Inner::default()
            }),
        }
    }

    /// SOAP requests sent so far (all sessions, including logins and retries).
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Logs out every session. The client stays usable: the next call logs
    /// in again.
    pub async fn shutdown(&self) {
        self.inner
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for session in self.inner.pool.drain() {
            if let Err(e) = session.logout().await {
                tracing::warn!(url = %session.url(), error = %e, "logout failed");
            }
        }
    }

    /// The shared session of an endpoint, for low-level calls with
    /// [`crate::methods`] (opened lazily: nothing is sent yet).
    ///
    /// # Errors
    /// [`VsphereError::Tls`] when the endpoint's thumbprint is malformed.
    pub fn session_for(&self, endpoint: &VcenterEndpoint) -> Result<Arc<Session>, VsphereError> {
        self.session(endpoint)
    }

    /// The names of every VM and template in `{datacenter}/vm/{folder_path}`
    /// and its sub-folders (one entry per VM, so a name that exists twice is
    /// listed twice); empty when the folder does not exist. For audits such
    /// as counting duplicates after a run.
    ///
    /// # Errors
    /// Faults and transport errors.
    pub async fn list_vm_names(
        &self,
        endpoint: &VcenterEndpoint,
        datacenter: &str,
        folder_path: &str,
    ) -> Result<Vec<String>, VsphereError> {
        let session = self.session(endpoint)?;
        let mut path = format!("{}/vm", escape_component(datacenter));
        for c in folder_components(folder_path) {
            path.push('/');
            path.push_str(&escape_component(c));
        }
        let Some(folder) = methods::find_by_inventory_path(&session, &path).await? else {
            return Ok(Vec::new());
        };
        Ok(methods::vm_names_below(&session, &folder, Some(1000))
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .collect())
    }

    fn session(&self, endpoint: &VcenterEndpoint) -> Result<Arc<Session>, VsphereError> {
        self.inner.pool.get(
            endpoint,
            &self.inner.options,
            &self.inner.requests,
            self.inner.connector.as_ref(),
        )
    }

    fn conn(&self, endpoint: &VcenterEndpoint) -> Result<Conn, VsphereError> {
        let session = self.session(endpoint)?;
        let cache = self
            .inner
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(session.id())
            .or_default()
            .clone();
        Ok(Conn { session, cache })
    }
}

/// Escapes one inventory path component (`/` and `%` are special there).
fn escape_component(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2f")
}

fn folder_components(path: &str) -> Vec<&str> {
    path.split('/')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

fn vm_path(spec: &VmSpec) -> String {
    let mut path = format!("{}/vm", escape_component(&spec.datacenter));
    for c in folder_components(&spec.folder_path) {
        path.push('/');
        path.push_str(&escape_component(c));
    }
    path.push('/');
    path.push_str(&escape_component(spec.name.as_str()));
    path
}

fn not_found(kind: &str, name: impl Into<String>) -> VsphereError {
    VsphereError::NotFound {
        kind: kind.into(),
        name: name.into(),
    }
}

/// Looks up an inventory path, caching hits.
async fn lookup(session: &Conn, path: &str) -> Result<Option<MoRef>, VsphereError> {
    let key = format!("path:{path}");
    if let Some(Cached::Ref(r)) = session.cached(&key) {
        return Ok(Some(r));
    }
    let found = methods::find_by_inventory_path(session, path).await?;
    if let Some(r) = &found {
        session.remember(key, Cached::Ref(r.clone()));
    }
    Ok(found)
}

#[derive(Clone, Debug)]
struct Inventory {
    vm_folder: MoRef,
    pool: MoRef,
    datastore: MoRef,
    network: NetworkBacking,
    template: MoRef,
    template_hardware: Hardware,
}

async fn resolve(session: &Conn, spec: &VmSpec) -> Result<Inventory, VsphereError> {
    let dc = escape_component(&spec.datacenter);
    if lookup(session, &dc).await?.is_none() {
        return Err(not_found("datacenter", &spec.datacenter));
    }
    let vm_folder = lookup(session, &format!("{dc}/vm"))
        .await?
        .ok_or_else(|| not_found("VM folder of datacenter", &spec.datacenter))?;
    let compute = format!("{dc}/host/{}", escape_component(&spec.cluster));
    let mut pool_path = format!("{compute}/Resources");
    if let Some(rp) = spec
        .resource_pool
        .as_deref()
        .filter(|p| !p.trim().is_empty())
    {
        for c in folder_components(rp) {
            pool_path.push('/');
            pool_path.push_str(&escape_component(c));
        }
    }
    let pool = match lookup(session, &pool_path).await? {
        Some(p) => p,
        None if lookup(session, &compute).await?.is_none() => {
            return Err(not_found("cluster or host", &spec.cluster));
        }
        None => {
            return Err(not_found(
                "resource pool",
                spec.resource_pool
                    .clone()
                    .unwrap_or_else(|| "Resources".into()),
            ));
        }
    };
    let datastore = lookup(
        session,
        &format!("{dc}/datastore/{}", escape_component(&spec.datastore)),
    )
    .await?
    .ok_or_else(|| not_found("datastore", &spec.datastore))?;
    let network = resolve_network(session, &dc, &spec.network).await?;
    let (template, template_hardware) =
        resolve_template(session, &dc, &vm_folder, &spec.template).await?;
    Ok(Inventory {
        vm_folder,
        pool,
        datastore,
        network,
        template,
        template_hardware,
    })
}

async fn resolve_network(
    session: &Conn,
    dc: &str,
    name: &str,
) -> Result<NetworkBacking, VsphereError> {
    let key = format!("network:{dc}|{name}");
    if let Some(Cached::Network(n)) = session.cached(&key) {
        return Ok(n);
    }
    let net = lookup(session, &format!("{dc}/network/{}", escape_component(name)))
        .await?
        .ok_or_else(|| not_found("network", name))?;
    let backing = match net.kind.as_str() {
        "Network" => NetworkBacking::Standard {
            name: name.to_owned(),
            network: net,
        },
        "DistributedVirtualPortgroup" => {
            let pg = methods::retrieve_properties(
                session,
                "DistributedVirtualPortgroup",
                &["config.key", "config.distributedVirtualSwitch"],
                std::slice::from_ref(&net),
            )
            .await?;
            let pg = pg.first().ok_or_else(|| not_found("network", name))?;
            let key_text = pg
                .prop("config.key")
                .map(|v| v.text.clone())
                .unwrap_or_else(|| net.value.clone());
            let dvs = pg
                .prop("config.distributedVirtualSwitch")
                .and_then(MoRef::from_node)
                .ok_or_else(|| VsphereError::Protocol {
                    message: format!("distributed port group {name:?} names no switch"),
                })?;
            let sw = methods::retrieve_properties(
                session,
                &dvs.kind,
                &["uuid"],
                std::slice::from_ref(&dvs),
            )
            .await?;
            let uuid = sw
                .first()
                .and_then(|s| s.prop("uuid"))
                .map(|u| u.text.clone())
                .ok_or_else(|| VsphereError::Protocol {
                    message: format!("distributed switch {dvs} has no uuid"),
                })?;
            NetworkBacking::Distributed {
                switch_uuid: uuid,
                portgroup_key: key_text,
            }
        }
        other => {
            return Err(not_found(
                &format!("standard or distributed port group (found {other})"),
                name,
            ));
        }
    };
    session.remember(key, Cached::Network(backing.clone()));
    Ok(backing)
}

async fn resolve_template(
    session: &Conn,
    dc: &str,
    vm_folder: &MoRef,
    template: &str,
) -> Result<(MoRef, Hardware), VsphereError> {
    let key = format!("template:{dc}|{template}");
    if let Some(Cached::Template(r, hw)) = session.cached(&key) {
        return Ok((r, hw));
    }
    let found = if let Some(absolute) = template.strip_prefix('/') {
        methods::find_by_inventory_path(session, absolute).await?
    } else {
        match methods::find_by_inventory_path(session, &format!("{dc}/vm/{template}")).await? {
            Some(r) => Some(r),
            None if !template.contains('/') => {
                methods::find_vms_named_below(session, vm_folder, template)
                    .await?
                    .into_iter()
                    .next()
            }
            None => None,
        }
    };
    let template_ref = found
        .filter(|r| r.kind == "VirtualMachine")
        .ok_or_else(|| not_found("template", template))?;
    let contents = methods::retrieve_properties(
        session,
        "VirtualMachine",
        &["config.hardware"],
        std::slice::from_ref(&template_ref),
    )
    .await?;
    let hardware = contents
        .first()
        .map(|c| VmProperties::from_content(c).hardware)
        .unwrap_or_default();
    session.remember(
        key,
        Cached::Template(template_ref.clone(), hardware.clone()),
    );
    Ok((template_ref, hardware))
}

/// Makes sure `{vm folder}/{folder_path}` exists; racing creators both win
/// (`DuplicateName` means someone else just made it).
async fn ensure_folder(
    session: &Conn,
    spec: &VmSpec,
    vm_folder: &MoRef,
) -> Result<MoRef, VsphereError> {
    let mut parent = vm_folder.clone();
    let mut path = format!("{}/vm", escape_component(&spec.datacenter));
    for component in folder_components(&spec.folder_path) {
        path.push('/');
        path.push_str(&escape_component(component));
        if let Some(existing) = lookup(session, &path).await? {
            parent = existing;
            continue;
        }
        parent =
            match methods::create_folder(session, &parent, component).await {
                Ok(created) => {
                    tracing::info!(folder = %path, "created folder");
                    created
                }
                Err(VsphereError::DuplicateName { .. }) => lookup(session, &path)
                    .await?
                    .ok_or_else(|| VsphereError::Protocol {
                        message: format!("folder {path} exists but cannot be found"),
                    })?,
                Err(e) => return Err(e),
            };
        session.remember(format!("path:{path}"), Cached::Ref(parent.clone()));
    }
    Ok(parent)
}

async fn read_vm(
    session: &Session,
    vm: &MoRef,
    paths: &[&str],
) -> Result<VmProperties, VsphereError> {
    let contents =
        methods::retrieve_properties(session, "VirtualMachine", paths, std::slice::from_ref(vm))
            .await?;
    let content = contents
        .into_iter()
        .find(|c| c.obj.as_ref() == Some(vm))
        .ok_or_else(|| not_found("VM", &vm.value))?;
    if let Some(missing) = content
        .missing
        .iter()
        .find(|m| m.fault.kind == "ManagedObjectNotFound")
    {
        return Err(not_found("VM", format!("{} ({})", vm.value, missing.path)));
    }
    Ok(VmProperties::from_content_owned(content))
}

fn carries(props: &VmProperties, vm_id: VmId) -> bool {
    props
        .extra(VM_ID_KEY)
        .and_then(|v| v.trim().parse::<VmId>().ok())
        == Some(vm_id)
}

fn duplicate(spec: &VmSpec) -> VsphereError {
    VsphereError::DuplicateName {
        name: spec.name.as_str().to_owned(),
        location: format!("{}/vm/{}", spec.datacenter, spec.folder_path),
    }
}

/// The VM named like the spec in its folder, if one exists: adopted when it
/// carries the spec's VM id, else `DuplicateName`.
async fn existing_vm(session: &Session, spec: &VmSpec) -> Result<Option<MoRef>, VsphereError> {
    let Some(vm) = methods::find_by_inventory_path(session, &vm_path(spec)).await? else {
        return Ok(None);
    };
    if vm.kind != "VirtualMachine" {
        return Err(duplicate(spec));
    }
    let props = read_vm(session, &vm, &["config.extraConfig"]).await?;
    if carries(&props, spec.vm_id) {
        tracing::info!(vm = %vm, "adopting the VM this request created earlier");
        Ok(Some(vm))
    } else {
        Err(duplicate(spec))
    }
}

fn kib_of(gib: u64) -> u64 {
    gib.saturating_mul(1024 * 1024)
}

/// What must change for `hardware` to match the spec (never shrinking the
/// disk; devices edited as read).
fn reconcile(spec: &VmSpec, inv: &Inventory, props: &VmProperties, in_clone: bool) -> ConfigSpec {
    let mut change = ConfigSpec::default();
    let hw = &props.hardware;
    if in_clone || hw.num_cpu != Some(spec.resources.cpu) {
        change.num_cpus = Some(spec.resources.cpu);
    }
    if in_clone || hw.memory_mb != Some(spec.resources.memory_mib) {
        change.memory_mb = Some(spec.resources.memory_mib);
    }
    let wanted_kib = kib_of(spec.resources.disk_gib);
    if let Some(disk) = hw.first_disk()
        && disk.capacity_kib().is_some_and(|kib| kib < wanted_kib)
    {
        change
            .device_changes
            .push(("edit", disk.with_capacity_kib(wanted_kib)));
    }
    if let Some(nic) = hw.nics().next()
        && !inv.network.matches(nic.0.child("backing"))
    {
        change
            .device_changes
            .push(("edit", nic.with_backing(&inv.network)));
    }
    if in_clone || !carries(props, spec.vm_id) {
        change
            .extra_config
            .push((VM_ID_KEY.to_owned(), spec.vm_id.to_string()));
    }
    change
}

fn result_of(
    vm: &MoRef,
    spec: &VmSpec,
    ip: Option<IpAddr>,
    reported_host: Option<&str>,
) -> VmProvisioningResult {
    let requested = spec.hostname.as_str();
    // The guest may report its FQDN; only the host label is ours.
    let mismatch = reported_host
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .filter(|h| {
            !h.split('.')
                .next()
                .unwrap_or_default()
                .eq_ignore_ascii_case(requested)
        })
        .map(|h| hostname_mismatch_warning(requested, h));
    VmProvisioningResult {
        vmware_vm_id: VmwareVmId::new(vm.value.clone()),
        warning_message: join_warnings(
            ip.is_none()
                .then(|| IP_TIMEOUT_WARNING.to_owned())
                .into_iter()
                .chain(mismatch),
        ),
        ip_address: ip,
        hostname: requested.to_owned(),
    }
}

impl SoapVsphere {
    /// Clones the VM. `CloneVM_Task` is never sent twice blindly: when
    /// its answer is lost in transit the clone may still have happened, so
    /// the VM is looked for first; found (and carrying our id) it is
    /// adopted, not found the clone is sent exactly once more.
    async fn clone_new(
        &self,
        session: &Conn,
        spec: &VmSpec,
        inv: &Inventory,
        folder: &MoRef,
    ) -> Result<MoRef, VsphereError> {
        let template_props = VmProperties {
            hardware: inv.template_hardware.clone(),
            ..VmProperties::default()
        };
        let clone_spec = CloneSpec {
            datastore: inv.datastore.clone(),
            pool: inv.pool.clone(),
            config: reconcile(spec, inv, &template_props, true),
        };
        let mut resent = false;
        let task = loop {
            match methods::clone_vm(
                session,
                &inv.template,
                folder,
                spec.name.as_str(),
                &clone_spec,
            )
            .await
            {
                Ok(task) => break task,
                // Only a transport failure can hide a clone that happened;
                // an open breaker means nothing was sent.
                Err(e @ VsphereError::Transport { .. }) if !resent => {
                    tracing::warn!(error = %e, "CloneVM_Task's answer was lost; looking for the VM");
                    match existing_vm(session, spec).await {
                        Ok(Some(vm)) => return Ok(vm),
                        Ok(None) => resent = true,
                        // Cannot tell whether the clone happened: give up
                        // this time; the next attempt looks first.
                        Err(VsphereError::Transport { .. } | VsphereError::CircuitOpen { .. }) => {
                            return Err(e);
                        }
                        Err(other) => return Err(other),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(task = %task.value, "clone started");
        match wait::wait_for_task(&session.session, &task, "CloneVM_Task", spec.task_timeout).await
        {
            Ok(result) => {
                result
                    .as_ref()
                    .and_then(MoRef::from_node)
                    .ok_or_else(|| VsphereError::Protocol {
                        message: format!("clone task {} finished without a VM", task.value),
                    })
            }
            Err(VsphereError::DuplicateName { .. }) => existing_vm(session, spec)
                .await?
                .ok_or_else(|| duplicate(spec)),
            Err(e) => Err(e),
        }
    }

    async fn run_task(
        &self,
        session: &Conn,
        task: Result<MoRef, VsphereError>,
        operation: &str,
        timeout: Duration,
    ) -> Result<crate::types::TaskInfo, VsphereError> {
        let task = task?;
        tracing::info!(task = %task.value, operation, "task started");
        wait::wait_for_task_info(&session.session, &task, operation, timeout).await
    }

    async fn create(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        let session = self.conn(&spec.endpoint)?;
        let inv = match resolve(&session, spec).await {
            Ok(inv) => inv,
            Err(VsphereError::NotFound { .. }) => {
                // A cached reference may have gone stale; look again once.
                session.cache.clear();
                resolve(&session, spec).await?
            }
            Err(e) => return Err(e),
        };
        let folder = ensure_folder(&session, spec, &inv.vm_folder).await?;
        let vm = match existing_vm(&session, spec).await? {
            Some(vm) => vm,
            None => self.clone_new(&session, spec, &inv, &folder).await?,
        };
        tracing::Span::current().record("vmware_vm_id", vm.value.as_str());
        let props = read_vm(&session, &vm, VM_CONFIG_PATHS).await?;
        // Events from before this call's customization are about an earlier
        // one; a VM found running was customized by an earlier attempt, whose
        // outcome is in its history.
        let mut customized_since = None;
        if props.runtime.power_state != Some(PowerState::PoweredOn) {
            let change = reconcile(spec, &inv, &props, false);
            if !change.is_empty() {
                self.run_task(
                    &session,
                    methods::reconfig_vm(&session, &vm, &change).await,
                    "ReconfigVM_Task",
                    spec.task_timeout,
                )
                .await?;
            }
            let nics = props.hardware.nics().count();
            let customized = self
                .run_task(
                    &session,
                    methods::customize_vm(
                        &session,
                        &vm,
                        spec.hostname.as_str(),
                        &self.inner.options.guest_domain,
                        nics,
                    )
                    .await,
                    "CustomizeVM_Task",
                    spec.task_timeout,
                )
                .await;
            // A customization refused because the VM is on means another
            // caller finished this (adopted) VM meanwhile: go on to the IP
            // wait below, as for a power-on refused for the same reason.
            // One refused because a customization is pending means a caller
            // (this request's, as the VM carries its id) customized it and
            // stopped before powering it on: the pending one is ours, and
            // powering on applies it.
            let customized = match customized {
                Err(VsphereError::TaskFailed { fault, .. }) if fault == "CustomizationPending" => {
                    tracing::info!(vm = %vm, "the customization this request sent earlier is pending; powering on");
                    // Its task's start is not known here: the VM's whole
                    // history counts (it has not run, so none is about it).
                    Ok(crate::types::TaskInfo::default())
                }
                other => other,
            };
            let powered = match customized {
                Err(e) => Err(e),
                Ok(info) => {
                    customized_since = info.start_time;
                    self.run_task(
                        &session,
                        methods::power_on_vm(&session, &vm).await,
                        "PowerOnVM_Task",
                        spec.task_timeout,
                    )
                    .await
                }
            };
            if let Err(e) = powered {
                // Someone (or a lost answer's retry) powered it on meanwhile:
                // that is the goal, not a failure.
                let already_on = matches!(e, VsphereError::InvalidPowerState { .. })
                    && read_vm(&session, &vm, &["runtime.powerState"])
                        .await?
                        .runtime
                        .power_state
                        == Some(PowerState::PoweredOn);
                if !already_on {
                    return Err(e);
                }
            }
        }
        if !spec.customization_timeout.is_zero() {
            progress(ProvisioningProgress::CustomizingGuest);
        }
        let ready = customization::wait_ready(
            session.session.clone(),
            &vm,
            customized_since.as_deref(),
            spec.customization_timeout,
            spec.ip_wait_timeout,
        )
        .await?;
        if ready.ip.is_none() {
            tracing::warn!(timeout = ?spec.ip_wait_timeout, "no guest IP in time");
        }
        Ok(result_of(
            &vm,
            spec,
            ready.ip.map(IpAddr::V4),
            ready.host_name.as_deref(),
        ))
    }

    async fn power_off(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        let session = self.conn(endpoint)?;
        let (vm, props) = owned_vm(&session, id, owner).await?;
        let state = props.runtime.power_state;
        if state == Some(PowerState::PoweredOff) {
            return Ok(PowerOffOutcome::AlreadyOff);
        }
        // No spec here: the client's own task limit applies.
        let timeout = self.inner.options.task_timeout;
        if let PowerOffMode::Guest { timeout: grace } = mode
            && state == Some(PowerState::PoweredOn)
            && props.guest.tools_running()
        {
            match methods::shutdown_guest(&session, &vm).await {
                Ok(()) => {
                    let mut power = props.runtime.power_state;
                    let off = wait::wait_until(
                        session.session.clone(),
                        vm.clone(),
                        POWER_PATHS,
                        grace,
                        &mut power,
                        |p, path, val| {
                            if path == "runtime.powerState" {
                                *p = val.and_then(|v| PowerState::parse(&v.text));
                            }
                        },
                        |p| *p == Some(PowerState::PoweredOff),
                    )
                    .await
                    .map_err(|e| gone(id, e))?;
                    if off {
                        return Ok(PowerOffOutcome::GuestShutdown);
                    }
                    tracing::warn!(vm = %vm, ?grace, "the guest did not shut down in time; powering off");
                }
                // Nothing was asked of the guest when vCenter is away; the
                // caller retries the whole power-off later.
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "the guest could not be asked to shut down; powering off");
                }
            }
        }
        let task = methods::power_off_vm(&session, &vm).await;
        match self
            .run_task(&session, task, "PowerOffVM_Task", timeout)
            .await
        {
            Ok(_) => Ok(PowerOffOutcome::Hard),
            // Off meanwhile (the guest finished shutting down, or another
            // caller): that is the goal.
            Err(VsphereError::InvalidPowerState { message }) => {
                let now = read_vm(&session, &vm, POWER_PATHS)
                    .await
                    .map_err(|e| gone(id, e))?;
                if now.runtime.power_state == Some(PowerState::PoweredOff) {
                    Ok(PowerOffOutcome::AlreadyOff)
                } else {
                    Err(VsphereError::InvalidPowerState { message })
                }
            }
            Err(e) => Err(gone(id, e)),
        }
    }

    async fn destroy(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        let session = self.conn(endpoint)?;
        let (vm, _) = owned_vm(&session, id, owner).await?;
        let task = methods::destroy(&session, &vm).await;
        let timeout = self.inner.options.task_timeout;
        self.run_task(&session, task, "Destroy_Task", timeout)
            .await
            .map(|_| ())
            .map_err(|e| gone(id, e))
    }

    async fn info(&self, session: &Session, vm: &MoRef) -> Result<VmGuestInfo, VsphereError> {
        let props = read_vm(session, vm, INFO_PATHS).await?;
        Ok(VmGuestInfo {
            vmware_vm_id: VmwareVmId::new(vm.value.clone()),
            name: props.name.clone().unwrap_or_default(),
            dvmm_vm_id: props.extra(VM_ID_KEY).and_then(|v| v.trim().parse().ok()),
            power_state: props
                .runtime
                .power_state
                .unwrap_or(PowerState::PoweredOff)
                .into(),
            tools_running: props.guest.tools_running(),
            ip_address: props.guest.usable_ipv4().map(IpAddr::V4),
            hostname: props.guest.host_name.clone(),
        })
    }
}

impl VspherePort for SoapVsphere {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        self.create_vm_reporting(spec, &|_| {}).await
    }

    async fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        let span = tracing::info_span!(
            "create_vm",
            vm = %spec.name,
            tenant = %spec.tenant_id,
            request = %spec.request_id,
            vm_id = %spec.vm_id,
            vmware_vm_id = tracing::field::Empty,
        );
        let result = self.create(spec, progress).instrument(span.clone()).await;
        match &result {
            Ok(r) => tracing::info!(parent: &span, ip = ?r.ip_address, "VM provisioned"),
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "VM provisioning failed");
                // A cached reference (template, pool, folder) may be stale:
                // the next attempt resolves the inventory afresh.
                if matches!(e, VsphereError::NotFound { .. })
                    && let Ok(session) = self.conn(&spec.endpoint)
                {
                    session.cache.clear();
                }
            }
        }
        result
    }

    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        let session = self.session(endpoint)?;
        let vm = MoRef::new("VirtualMachine", id.as_str());
        // A VM that is not there any more is `VmGone`, as for power-off and
        // destroy: a caller must not mistake it for a missing template.
        self.info(&session, &vm).await.map_err(|e| gone(id, e))
    }

    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        let span = tracing::info_span!("power_off_vm", vmware_vm_id = %id, vm_id = %owner, ?mode);
        self.power_off(endpoint, id, owner, mode)
            .instrument(span)
            .await
    }

    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        let span = tracing::info_span!("destroy_vm", vmware_vm_id = %id, vm_id = %owner);
        self.destroy(endpoint, id, owner).instrument(span).await
    }

    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        let session = self.session(&spec.endpoint)?;
        match methods::find_by_inventory_path(&session, &vm_path(spec)).await? {
            Some(vm) if vm.kind == "VirtualMachine" => Ok(Some(self.info(&session, &vm).await?)),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_paths_escape_components() {
        assert_eq!(escape_component("a/b%c"), "a%2fb%25c");
        assert_eq!(folder_components("/acme//web/"), vec!["acme", "web"]);
    }
}
