//! The simulator's state: the inventory indexed for lookups, the VMs with
//! their lifecycle timestamps, the IP pool, fault rules and call counters.
//!
//! Everything here is synchronous and runs under the simulator's one mutex;
//! the async layer in `mod.rs` only sleeps between the instants computed
//! here. A VM's progress (cloning → powered on → IP reported) is derived
//! from those instants and the current tokio time, so a clone "keeps
//! running" after the call that started it is dropped, without any
//! background task.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use dvmm_core::spec::{PowerState, VmGuestInfo};
use dvmm_core::{VmId, VmResources, VmSpec, VmwareVmId, VsphereError};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use super::config::{Delays, GuestCustomization, IpMode, IpPool, SimulatorConfig};
use super::fault::{Fault, FaultRules, Operation};
use super::inventory::{DEFAULT_DATACENTER, SimCluster, SimDatacenter};

/// How long a guest takes to shut down when asked, unless a test says
/// otherwise.
pub(crate) const DEFAULT_GUEST_SHUTDOWN: Duration = Duration::from_secs(2);

/// The number in the first VM's managed-object id (`vm-1000`).
pub(crate) const FIRST_VM_NUMBER: u64 = 1000;

/// A VM as a test sees it through `Simulator::vms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimVm {
    /// Managed-object id (`vm-1000`, `vm-1001`, … in creation order).
    pub vmware_vm_id: VmwareVmId,
    /// VM name.
    pub name: String,
    /// Folder path below the datacenter's VM folder (`acme/web`).
    pub folder_path: String,
    /// Datacenter name.
    pub datacenter: String,
    /// The dvmm id written into the VM; `None` for VMs dvmm did not create.
    pub dvmm_vm_id: Option<VmId>,
    /// CPU, memory and (possibly grown) disk.
    pub resources: VmResources,
    /// Port group of the first NIC.
    pub network: String,
    /// Power state now (`PoweredOff` while the clone is still running).
    pub power_state: PowerState,
    /// The IP the guest reports now, if any.
    pub ip_address: Option<IpAddr>,
    /// The hostname set by guest customization.
    pub hostname: Option<String>,
    /// The template it was cloned from (empty when unknown).
    pub template: String,
    /// Datastore of its disk.
    pub datastore: String,
}

#[derive(Clone, Copy, Debug)]
enum Power {
    Off,
    Suspended,
    /// Powered on from this instant; before it, the clone is still running
    /// and the VM reads as powered off.
    OnFrom(Instant),
}

#[derive(Clone, Copy, Debug)]
struct Guest {
    /// When VMware Tools starts; `None`: never.
    tools_from: Option<Instant>,
    ip: Option<Ipv4Addr>,
    /// When Tools reports `ip`.
    ip_from: Instant,
    /// The pool slot `ip` came from, to give it back.
    pool_slot: Option<u32>,
    /// When customization finishes (the guest has rebooted into its own
    /// identity and vCenter records the success).
    customized_from: Instant,
    /// What the guest reports before that.
    pre_ip: Option<Ipv4Addr>,
}

#[derive(Debug)]
struct VmRecord {
    id: VmwareVmId,
    name: Arc<str>,
    folder: Arc<str>,
    datacenter: Arc<str>,
    dvmm_vm_id: Option<VmId>,
    resources: VmResources,
    network: Arc<str>,
    template: Arc<str>,
    datastore: Arc<str>,
    hostname: Option<Arc<str>>,
    /// When its clone task started (vCenter's task start time).
    clone_started: Instant,
    power: Power,
    guest: Guest,
}

impl VmRecord {
    fn power_state(&self, now: Instant) -> PowerState {
        match self.power {
            Power::OnFrom(at) if at <= now => PowerState::PoweredOn,
            Power::OnFrom(_) | Power::Off => PowerState::PoweredOff,
            Power::Suspended => PowerState::Suspended,
        }
    }

    fn tools_running(&self, now: Instant) -> bool {
        self.power_state(now) == PowerState::PoweredOn
            && self.guest.tools_from.is_some_and(|at| at <= now)
    }

    /// When the guest's IP becomes visible, if nothing changes.
    fn ip_visible_from(&self) -> Option<Instant> {
        let (Power::OnFrom(on), Some(tools), Some(_)) =
            (self.power, self.guest.tools_from, self.guest.ip)
        else {
            return None;
        };
        Some(
            on.max(tools)
                .max(self.guest.ip_from)
                .max(self.guest.customized_from),
        )
    }

    /// The address the guest reports: the template identity's while
    /// customizing, then its own.
    fn reported_ip(&self, now: Instant) -> Option<IpAddr> {
        self.ip(now).or_else(|| {
            (self.tools_running(now) && now < self.guest.customized_from)
                .then_some(self.guest.pre_ip.map(IpAddr::V4))
                .flatten()
        })
    }

    fn ip(&self, now: Instant) -> Option<IpAddr> {
        match self.ip_visible_from() {
            Some(at) if at <= now => self.guest.ip.map(IpAddr::V4),
            _ => None,
        }
    }

    fn guest_info(&self, now: Instant) -> VmGuestInfo {
        let tools = self.tools_running(now);
        VmGuestInfo {
            vmware_vm_id: self.id.clone(),
            name: self.name.to_string(),
            dvmm_vm_id: self.dvmm_vm_id,
            power_state: self.power_state(now),
            tools_running: tools,
            ip_address: self.reported_ip(now),
            hostname: if tools {
                self.hostname.as_deref().map(str::to_owned)
            } else {
                None
            },
        }
    }

    fn snapshot(&self, now: Instant) -> SimVm {
        SimVm {
            vmware_vm_id: self.id.clone(),
            name: self.name.to_string(),
            folder_path: self.folder.to_string(),
            datacenter: self.datacenter.to_string(),
            dvmm_vm_id: self.dvmm_vm_id,
            resources: self.resources,
            network: self.network.to_string(),
            power_state: self.power_state(now),
            ip_address: self.reported_ip(now),
            hostname: self.hostname.as_deref().map(str::to_owned),
            template: self.template.to_string(),
            datastore: self.datastore.to_string(),
        }
    }
}

/// A datacenter with its names interned, so a clone shares them instead of
/// allocating copies.
#[derive(Debug)]
struct DcState {
    name: Arc<str>,
    clusters: Vec<SimCluster>,
    datastores: Vec<(Arc<str>, u64)>,
    networks: Vec<Arc<str>>,
    templates: Vec<(Arc<str>, VmResources)>,
    /// Folder path → VM name → VM number: names are unique per folder.
    folders: HashMap<Arc<str>, HashMap<Arc<str>, u64>>,
}

impl DcState {
    fn new(dc: &SimDatacenter) -> Self {
        let mut state = Self {
            name: dc.name.as_str().into(),
            clusters: dc.clusters.clone(),
            datastores: dc
                .datastores
                .iter()
                .map(|d| (d.name.as_str().into(), d.free_gib))
                .collect(),
            networks: dc.networks.iter().map(|n| n.name.as_str().into()).collect(),
            templates: dc
                .templates
                .iter()
                .map(|t| (t.name.as_str().into(), t.resources))
                .collect(),
            folders: HashMap::new(),
        };
        for folder in &dc.folders {
            state.folder_mut(&normalize_folder(folder));
        }
        state
    }

    fn folder_mut(&mut self, path: &str) -> (Arc<str>, &mut HashMap<Arc<str>, u64>) {
        // Look up before `entry`, so the common case (the folder exists)
        // does not allocate a key.
        let key = match self.folders.get_key_value(path) {
            Some((key, _)) => key.clone(),
            None => Arc::from(path),
        };
        let names = self.folders.entry(key.clone()).or_default();
        (key, names)
    }

    fn lookup(&self, folder: &str, name: &str) -> Option<u64> {
        self.folders.get(folder)?.get(name).copied()
    }
}

/// Lowest-free-first allocation over `start .. start + capacity`.
#[derive(Debug)]
struct PoolState {
    start: u32,
    capacity: u32,
    /// Slots below this have been handed out at least once.
    high_water: u32,
    /// Slots below `high_water` that were given back.
    freed: BTreeSet<u32>,
}

impl PoolState {
    fn new(pool: IpPool) -> Self {
        Self {
            start: u32::from(pool.start),
            capacity: pool.capacity(),
            high_water: 0,
            freed: BTreeSet::new(),
        }
    }

    fn allocate(&mut self) -> Option<(u32, Ipv4Addr)> {
        let slot = match self.freed.pop_first() {
            Some(slot) => slot,
            None if self.high_water < self.capacity => {
                self.high_water += 1;
                self.high_water - 1
            }
            None => return None,
        };
        Some((slot, Ipv4Addr::from(self.start + slot)))
    }

    fn release(&mut self, slot: u32) {
        if slot < self.high_water {
            self.freed.insert(slot);
        }
    }
}

/// What `place` did for a `create_vm`.
#[derive(Debug)]
pub(crate) struct Placement {
    pub(crate) number: u64,
    pub(crate) id: VmwareVmId,
    /// The IP if the guest already reports it.
    pub(crate) ip_now: Option<IpAddr>,
    /// Whether an existing VM was adopted instead of cloned.
    pub(crate) adopted: bool,
}

/// Where a VM stands for a waiting `create_vm`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The clone is running; the VM powers on at this instant.
    PoweringOn(Instant),
    /// Past power-on (or powered off again by a test hook).
    Running(IpStatus),
}

/// Where a VM's IP stands for a waiting `create_vm`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IpStatus {
    Reported(IpAddr),
    /// Not yet; reported at this instant if nothing changes, or never.
    Pending(Option<Instant>),
}

/// The whole simulated vCenter.
#[derive(Debug)]
pub(crate) struct State {
    dcs: Vec<DcState>,
    /// VM number − [`FIRST_VM_NUMBER`] → VM; `None` once removed.
    vms: Vec<Option<VmRecord>>,
    delays: Delays,
    ip_mode: IpMode,
    customization: GuestCustomization,
    pool: PoolState,
    rules: FaultRules,
    calls: [u64; Operation::ALL.len()],
    rng: StdRng,
    /// Unreachable endpoints by [`dvmm_core::config::endpoint_key`].
    outages: std::collections::HashMap<String, Outage>,
    unreachable_calls: u64,
    /// How long a guest with Tools running takes to shut down when asked;
    /// `None`: it ignores the request.
    guest_shutdown: Option<Duration>,
}

/// How a VM that `power_off_vm` may touch stands now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PowerView {
    /// Powered off (or still cloning, which reads as off).
    Off,
    /// Suspended: no guest to ask.
    Suspended,
    /// On, with Tools running (the guest can be asked to shut down).
    OnWithTools,
    /// On, without Tools.
    OnWithoutTools,
}

/// How long an endpoint stays unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outage {
    /// Until the test says it is back.
    UntilUp,
    /// For this many more calls.
    Calls(u32),
}

fn not_found(kind: &str, name: &str) -> VsphereError {
    VsphereError::NotFound {
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

/// `acme/web` for `/acme//web/`: vCenter folder paths have no empty parts.
pub(crate) fn normalize_folder(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') && !path.ends_with('/') && !path.contains("//") {
        return Cow::Borrowed(path);
    }
    Cow::Owned(
        path.split('/')
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("/"),
    )
}

/// Powers `vm` on at `at`; its guest boots and, when guests report IPs,
/// Tools reports the VM's address (a new one from the pool if it has none;
/// with the pool exhausted it gets none, like a guest without a DHCP
/// lease) `ip_report` later.
fn boot(
    vm: &mut VmRecord,
    at: Instant,
    reports_ip: bool,
    ip_report: Duration,
    pool: &mut PoolState,
) {
    vm.power = Power::OnFrom(at);
    // A boot after customization finished keeps the guest's identity.
    if vm.guest.customized_from > at {
        vm.guest.customized_from = at;
    }
    if reports_ip {
        vm.guest.tools_from = Some(at);
        if vm.guest.ip.is_none()
            && let Some((slot, ip)) = pool.allocate()
        {
            vm.guest.ip = Some(ip);
            vm.guest.pool_slot = Some(slot);
        }
    } else {
        vm.guest.tools_from = None;
    }
    vm.guest.ip_from = later(at, ip_report);
}

/// `at + by`, or a far-away instant when that overflows.
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl State {
    pub(crate) fn new(config: &SimulatorConfig) -> Self {
        Self {
            dcs: config
                .inventory
                .datacenters
                .iter()
                .map(DcState::new)
                .collect(),
            vms: Vec::new(),
            delays: config.delays,
            ip_mode: config.ip_mode,
            customization: config.customization,
            pool: PoolState::new(config.ip_pool),
            rules: FaultRules::default(),
            calls: [0; Operation::ALL.len()],
            rng: StdRng::seed_from_u64(config.seed),
            outages: std::collections::HashMap::new(),
            unreachable_calls: 0,
            guest_shutdown: Some(DEFAULT_GUEST_SHUTDOWN),
        }
    }

    pub(crate) fn set_guest_shutdown(&mut self, after: Option<Duration>) {
        self.guest_shutdown = after;
    }

    pub(crate) fn guest_shutdown(&self) -> Option<Duration> {
        self.guest_shutdown
    }

    /// The VM's number when it exists and carries `owner` as its dvmm id:
    /// `VmGone` when it does not exist, `NotOurs` when it carries another
    /// id or none.
    pub(crate) fn owned(&self, id: &VmwareVmId, owner: VmId) -> Result<u64, VsphereError> {
        let number = self.number_of(id).ok_or_else(|| VsphereError::VmGone {
            vmware_vm_id: id.as_str().to_owned(),
        })?;
        match self.record(number) {
            Some(vm) if vm.dvmm_vm_id == Some(owner) => Ok(number),
            Some(_) => Err(VsphereError::NotOurs {
                vmware_vm_id: id.as_str().to_owned(),
            }),
            None => Err(VsphereError::VmGone {
                vmware_vm_id: id.as_str().to_owned(),
            }),
        }
    }

    pub(crate) fn power_view(&self, number: u64, now: Instant) -> Option<PowerView> {
        let vm = self.record(number)?;
        Some(match vm.power_state(now) {
            PowerState::PoweredOff => PowerView::Off,
            PowerState::Suspended => PowerView::Suspended,
            PowerState::PoweredOn if vm.tools_running(now) => PowerView::OnWithTools,
            PowerState::PoweredOn => PowerView::OnWithoutTools,
        })
    }

    /// Cuts the power; the guest's IP stays its own (a power-on reports it
    /// again). Returns false when there is no such VM.
    pub(crate) fn power_off(&mut self, number: u64) -> bool {
        let Some(vm) = self.record_mut(number) else {
            return false;
        };
        vm.power = Power::Off;
        true
    }

    /// Destroys a VM that is not powered on.
    pub(crate) fn destroy(&mut self, number: u64, now: Instant) -> Result<(), VsphereError> {
        let Some(vm) = self.record(number) else {
            return Err(VsphereError::VmGone {
                vmware_vm_id: format!("vm-{number}"),
            });
        };
        if vm.power_state(now) == PowerState::PoweredOn {
            return Err(VsphereError::InvalidPowerState {
                message: format!("VM {} is powered on; power it off first", vm.id),
            });
        }
        let id = vm.id.clone();
        self.remove_vm(&id);
        Ok(())
    }

    pub(crate) fn set_outage(&mut self, endpoint: String, outage: Option<Outage>) {
        match outage {
            Some(Outage::Calls(0)) | None => self.outages.remove(&endpoint),
            Some(outage) => self.outages.insert(endpoint, outage),
        };
    }

    /// Whether a new call of `operation` to `endpoint` is refused; counts
    /// it (as a call of the operation, too) and spends a counted outage.
    pub(crate) fn refuse_call(&mut self, operation: Operation, endpoint: &str) -> bool {
        let Some(outage) = self.outages.get_mut(endpoint) else {
            return false;
        };
        if let Outage::Calls(left) = outage {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.outages.remove(endpoint);
            }
        }
        self.calls[operation.index()] += 1;
        self.unreachable_calls += 1;
        true
    }

    /// Whether calls already connected to `endpoint` lose their connection.
    pub(crate) fn is_down(&self, endpoint: &str) -> bool {
        self.outages.get(endpoint) == Some(&Outage::UntilUp)
    }

    pub(crate) fn unreachable_calls(&self) -> u64 {
        self.unreachable_calls
    }

    pub(crate) fn rules_mut(&mut self) -> &mut FaultRules {
        &mut self.rules
    }

    pub(crate) fn set_ip_mode(&mut self, mode: IpMode) {
        self.ip_mode = mode;
    }

    pub(crate) fn ip_mode(&self) -> IpMode {
        self.ip_mode
    }

    pub(crate) fn set_delays(&mut self, delays: Delays, now: Instant) {
        self.delays = delays;
        for vm in self.vms.iter_mut().flatten() {
            let Power::OnFrom(on) = vm.power else {
                continue;
            };
            let on = if on > now {
                let replanned = later(vm.clone_started, delays.until_powered_on()).max(now);
                vm.power = Power::OnFrom(replanned);
                if vm.guest.tools_from.is_some() {
                    vm.guest.tools_from = Some(replanned);
                }
                replanned
            } else {
                on
            };
            if vm.guest.ip_from > now {
                vm.guest.ip_from = later(on, delays.ip_report).max(now);
            }
            if vm.guest.customized_from > now {
                vm.guest.customized_from = later(on, self.customization.duration).max(now);
            }
        }
    }

    /// Counts a call and picks its fault.
    pub(crate) fn begin(&mut self, operation: Operation) -> Option<Fault> {
        let count = &mut self.calls[operation.index()];
        *count += 1;
        let number = *count;
        if self.rules.is_empty() {
            return None;
        }
        self.rules.pick(operation, number, &mut self.rng)
    }

    pub(crate) fn call_count(&self, operation: Operation) -> u64 {
        self.calls[operation.index()]
    }

    fn datacenter(&self, name: &str) -> Result<usize, VsphereError> {
        self.dcs
            .iter()
            .position(|dc| &*dc.name == name)
            .ok_or_else(|| not_found("datacenter", name))
    }

    fn record(&self, number: u64) -> Option<&VmRecord> {
        let index = usize::try_from(number.checked_sub(FIRST_VM_NUMBER)?).ok()?;
        self.vms.get(index)?.as_ref()
    }

    fn record_mut(&mut self, number: u64) -> Option<&mut VmRecord> {
        let index = usize::try_from(number.checked_sub(FIRST_VM_NUMBER)?).ok()?;
        self.vms.get_mut(index)?.as_mut()
    }

    /// The number of the VM with this managed-object id.
    fn number_of(&self, id: &VmwareVmId) -> Option<u64> {
        let number: u64 = id.as_str().strip_prefix("vm-")?.parse().ok()?;
        // `vm-01000` parses like `vm-1000` but is another id.
        (self.record(number)?.id == *id).then_some(number)
    }

    fn next_number(&self) -> u64 {
        FIRST_VM_NUMBER + self.vms.len() as u64
    }

    /// Validates `spec`, then adopts the VM it names or starts its clone.
    ///
    /// Order: the names in the spec must exist (a wrong spec is wrong even
    /// for a rerun); then an existing VM of that name is adopted or refused;
    /// only a new clone needs datastore space and an IP.
    pub(crate) fn place(&mut self, spec: &VmSpec, now: Instant) -> Result<Placement, VsphereError> {
        let dc_index = self.datacenter(&spec.datacenter)?;
        let dc = &self.dcs[dc_index];
        let cluster = dc
            .clusters
            .iter()
            .find(|c| c.name == spec.cluster)
            .ok_or_else(|| not_found("cluster", &spec.cluster))?;
        if let Some(pool) = &spec.resource_pool {
            let wanted = pool.trim_matches('/');
            // An empty path is the cluster's root pool.
            if !wanted.is_empty()
                && !cluster
                    .resource_pools
                    .iter()
                    .any(|p| p.trim_matches('/') == wanted)
            {
                return Err(not_found("resource pool", pool));
            }
        }
        let (datastore, free_gib) = dc
            .datastores
            .iter()
            .find(|(name, _)| **name == *spec.datastore)
            .cloned()
            .ok_or_else(|| not_found("datastore", &spec.datastore))?;
        let network = dc
            .networks
            .iter()
            .find(|name| ***name == *spec.network)
            .cloned()
            .ok_or_else(|| not_found("network", &spec.network))?;
        let (template, template_resources) = dc
            .templates
            .iter()
            .find(|(name, _)| **name == *spec.template)
            .cloned()
            .ok_or_else(|| not_found("template", &spec.template))?;

        let folder = normalize_folder(&spec.folder_path);
        if let Some(number) = dc.lookup(&folder, spec.name.as_str()) {
            return self.adopt(number, spec, &folder, now);
        }

        // vSphere grows a disk but never shrinks one.
        let disk_gib = template_resources.disk_gib.max(spec.resources.disk_gib);
        if free_gib < disk_gib {
            return Err(VsphereError::InsufficientResources {
                message: format!(
                    "datastore {datastore} has {free_gib} GiB free, the VM needs {disk_gib} GiB"
                ),
            });
        }
        let reports_ip = self.ip_mode == IpMode::Report;
        let lease = if reports_ip {
            Some(
                self.pool
                    .allocate()
                    .ok_or_else(|| VsphereError::InsufficientResources {
                        message: format!(
                            "no free IP address left in the pool of {} addresses",
                            self.pool.capacity
                        ),
                    })?,
            )
        } else {
            None
        };

        let number = self.next_number();
        let id = VmwareVmId::new(format!("vm-{number}"));
        let powered_on_at = later(now, self.delays.until_powered_on());
        let ip_from = later(powered_on_at, self.delays.ip_report);
        let customized_from = later(powered_on_at, self.customization.duration);
        let dc = &mut self.dcs[dc_index];
        let (folder, names) = dc.folder_mut(&folder);
        let name: Arc<str> = spec.name.as_str().into();
        names.insert(name.clone(), number);
        let hostname = if spec.hostname.as_str() == spec.name.as_str() {
            name.clone()
        } else {
            spec.hostname.as_str().into()
        };
        let record = VmRecord {
            id: id.clone(),
            name,
            folder,
            datacenter: dc.name.clone(),
            dvmm_vm_id: Some(spec.vm_id),
            resources: VmResources {
                disk_gib,
                ..spec.resources
            },
            network,
            template,
            datastore,
            hostname: Some(hostname),
            clone_started: now,
            power: Power::OnFrom(powered_on_at),
            guest: Guest {
                tools_from: reports_ip.then_some(powered_on_at),
                ip: lease.map(|(_, ip)| ip),
                ip_from,
                pool_slot: lease.map(|(slot, _)| slot),
                customized_from,
                pre_ip: self.customization.pre_customization_ip,
            },
        };
        let ip_now = record.ip(now);
        self.vms.push(Some(record));
        Ok(Placement {
            number,
            id,
            ip_now,
            adopted: false,
        })
    }

    fn adopt(
        &mut self,
        number: u64,
        spec: &VmSpec,
        folder: &str,
        now: Instant,
    ) -> Result<Placement, VsphereError> {
        let delays = self.delays;
        let reports_ip = self.ip_mode == IpMode::Report;
        let Some(index) = number
            .checked_sub(FIRST_VM_NUMBER)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return Err(not_found("vm", spec.name.as_str()));
        };
        let Some(Some(vm)) = self.vms.get_mut(index) else {
            return Err(not_found("vm", spec.name.as_str()));
        };
        if vm.dvmm_vm_id != Some(spec.vm_id) {
            return Err(VsphereError::DuplicateName {
                name: spec.name.as_str().to_owned(),
                location: folder.to_owned(),
            });
        }
        if matches!(vm.power, Power::Off | Power::Suspended) {
            // Adoption finishes the job: a VM found powered off is powered
            // on, and its guest boots again.
            let at = later(now, delays.power_on);
            boot(vm, at, reports_ip, delays.ip_report, &mut self.pool);
        }
        Ok(Placement {
            number,
            id: vm.id.clone(),
            ip_now: vm.ip(now),
            adopted: true,
        })
    }

    /// When the VM powers on and when its customization finishes.
    pub(crate) fn customization_window(
        &self,
        number: u64,
    ) -> Result<(Option<Instant>, Instant), VsphereError> {
        let vm = self
            .record(number)
            .ok_or_else(|| not_found("vm", &format!("vm-{number}")))?;
        let on = match vm.power {
            Power::OnFrom(at) => Some(at),
            Power::Off | Power::Suspended => None,
        };
        Ok((on, vm.guest.customized_from))
    }

    /// Makes the VM's customization finish `by` later.
    pub(crate) fn delay_customization(&mut self, number: u64, by: Duration) {
        let Some(index) = number
            .checked_sub(FIRST_VM_NUMBER)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if let Some(Some(vm)) = self.vms.get_mut(index) {
            vm.guest.customized_from = later(vm.guest.customized_from, by);
        }
    }

    pub(crate) fn progress(&self, number: u64, now: Instant) -> Result<Progress, VsphereError> {
        let vm = self
            .record(number)
            .ok_or_else(|| not_found("vm", &format!("vm-{number}")))?;
        Ok(match (vm.power, vm.ip(now)) {
            (Power::OnFrom(at), _) if at > now => Progress::PoweringOn(at),
            (_, Some(ip)) => Progress::Running(IpStatus::Reported(ip)),
            (_, None) => Progress::Running(IpStatus::Pending(vm.ip_visible_from())),
        })
    }

    pub(crate) fn guest_info(
        &self,
        id: &VmwareVmId,
        now: Instant,
    ) -> Result<VmGuestInfo, VsphereError> {
        self.number_of(id)
            .and_then(|n| self.record(n))
            .map(|vm| vm.guest_info(now))
            .ok_or_else(|| VsphereError::VmGone {
                vmware_vm_id: id.as_str().to_owned(),
            })
    }

    pub(crate) fn find(
        &self,
        spec: &VmSpec,
        now: Instant,
    ) -> Result<Option<VmGuestInfo>, VsphereError> {
        let dc = &self.dcs[self.datacenter(&spec.datacenter)?];
        let folder = normalize_folder(&spec.folder_path);
        Ok(dc
            .lookup(&folder, spec.name.as_str())
            .and_then(|n| self.record(n))
            .map(|vm| vm.guest_info(now)))
    }

    pub(crate) fn snapshot(&self, now: Instant) -> Vec<SimVm> {
        self.vms
            .iter()
            .flatten()
            .map(|vm| vm.snapshot(now))
            .collect()
    }

    pub(crate) fn vm(&self, id: &VmwareVmId, now: Instant) -> Option<SimVm> {
        self.record(self.number_of(id)?).map(|vm| vm.snapshot(now))
    }

    /// Returns false when there is no such VM.
    pub(crate) fn set_guest_ip(
        &mut self,
        id: &VmwareVmId,
        ip: Option<IpAddr>,
        now: Instant,
    ) -> bool {
        let Some(number) = self.number_of(id) else {
            return false;
        };
        let Some(vm) = self.record_mut(number) else {
            return false;
        };
        let old_slot = vm.guest.pool_slot.take();
        match ip {
            Some(IpAddr::V4(v4)) => {
                vm.guest.ip = Some(v4);
                vm.guest.ip_from = now;
                if vm.guest.tools_from.is_none_or(|at| at > now) {
                    vm.guest.tools_from = Some(now);
                }
            }
            // The guest info this models reports IPv4 only (like the SOAP
            // client, which picks the first IPv4 address).
            Some(IpAddr::V6(_)) | None => vm.guest.ip = None,
        }
        if let Some(slot) = old_slot {
            self.pool.release(slot);
        }
        true
    }

    /// Returns false when there is no such VM.
    pub(crate) fn set_power_state(
        &mut self,
        id: &VmwareVmId,
        state: PowerState,
        now: Instant,
    ) -> bool {
        let Some(number) = self.number_of(id) else {
            return false;
        };
        let reports_ip = self.ip_mode == IpMode::Report;
        let ip_report = self.delays.ip_report;
        let index = (number - FIRST_VM_NUMBER) as usize;
        let Some(Some(vm)) = self.vms.get_mut(index) else {
            return false;
        };
        vm.power = match state {
            PowerState::PoweredOn => {
                if !matches!(vm.power, Power::OnFrom(_)) {
                    boot(vm, now, reports_ip, ip_report, &mut self.pool);
                }
                return true;
            }
            PowerState::PoweredOff => Power::Off,
            PowerState::Suspended => Power::Suspended,
        };
        true
    }

    /// Returns false when there is no such VM.
    pub(crate) fn remove_vm(&mut self, id: &VmwareVmId) -> bool {
        let Some(number) = self.number_of(id) else {
            return false;
        };
        let index = (number - FIRST_VM_NUMBER) as usize;
        let Some(vm) = self.vms.get_mut(index).and_then(Option::take) else {
            return false;
        };
        if let Some(slot) = vm.guest.pool_slot {
            self.pool.release(slot);
        }
        if let Some(dc) = self.dcs.iter_mut().find(|dc| dc.name == vm.datacenter)
            && let Some(names) = dc.folders.get_mut(&*vm.folder)
        {
            names.remove(&*vm.name);
        }
        true
    }

    /// Adds a powered-on VM without a dvmm id to the first datacenter (one
    /// named `DC0` is created in an empty inventory). When the folder
    /// already holds a VM of that name, that VM's id is returned.
    pub(crate) fn insert_foreign(&mut self, folder: &str, name: &str, now: Instant) -> VmwareVmId {
        if self.dcs.is_empty() {
            self.dcs
                .push(DcState::new(&SimDatacenter::new(DEFAULT_DATACENTER)));
        }
        let folder = normalize_folder(folder);
        if let Some(existing) = self.dcs[0].lookup(&folder, name)
            && let Some(vm) = self.record(existing)
        {
            return vm.id.clone();
        }
        let number = self.next_number();
        let id = VmwareVmId::new(format!("vm-{number}"));
        let dc = &mut self.dcs[0];
        let empty: Arc<str> = Arc::from("");
        let network = dc
            .networks
            .first()
            .cloned()
            .unwrap_or_else(|| empty.clone());
        let datastore = dc
            .datastores
            .first()
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| empty.clone());
        let resources = dc
            .templates
            .first()
            .map(|(_, r)| *r)
            .unwrap_or(super::inventory::DEFAULT_TEMPLATE_RESOURCES);
        let datacenter = dc.name.clone();
        let (folder, names) = dc.folder_mut(&folder);
        let name: Arc<str> = name.into();
        names.insert(name.clone(), number);
        self.vms.push(Some(VmRecord {
            id: id.clone(),
            name,
            folder,
            datacenter,
            dvmm_vm_id: None,
            resources,
            network,
            template: empty,
            datastore,
            hostname: None,
            clone_started: now,
            power: Power::OnFrom(now),
            guest: Guest {
                tools_from: None,
                ip: None,
                ip_from: now,
                pool_slot: None,
                // A foreign VM: whatever customized it is long over.
                customized_from: now,
                pre_ip: None,
            },
        }));
        id
    }

    pub(crate) fn folders(&self, datacenter: &str) -> Vec<String> {
        let Some(dc) = self.dcs.iter().find(|dc| &*dc.name == datacenter) else {
            return Vec::new();
        };
        let mut folders: Vec<String> = dc.folders.keys().map(|k| k.to_string()).collect();
        folders.sort();
        folders
    }

    /// Names of the first datacenter with a cluster, datastore, network
    /// and template, and the first of each.
    pub(crate) fn default_placement(&self) -> Option<[String; 5]> {
        self.dcs.iter().find_map(|dc| {
            Some([
                dc.name.to_string(),
                dc.clusters.first()?.name.clone(),
                dc.datastores.first()?.0.to_string(),
                dc.networks.first()?.to_string(),
                dc.templates.first()?.0.to_string(),
            ])
        })
    }

    pub(crate) fn vm_count(&self) -> usize {
        self.vms.iter().flatten().count()
    }
}
