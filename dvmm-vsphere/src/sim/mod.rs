//! An in-process vCenter simulator implementing [`VspherePort`].
//!
//! It is the embedded default of dvmm (no vCenter needed to try the library)
//! and the test double that exercises every provisioning path offline. It
//! models what the SOAP adapter sees of a real vCenter:
//!
//! - an [`Inventory`] of datacenters, clusters (with resource pools),
//!   datastores (with free space), standard and distributed port groups,
//!   templates and folders; a spec naming anything missing fails with
//!   `VsphereError::NotFound { kind, .. }` (`datacenter`, `cluster`,
//!   `resource pool`, `datastore`, `network`, `template`);
//! - clones that honour the spec (CPU, memory, network, hostname; the disk
//!   grows to the requested size but never shrinks below the template's),
//!   land in `spec.folder_path` (created on demand) and power on;
//! - VM names unique per folder: `create_vm` adopts a VM of the same name
//!   that carries the spec's dvmm [`VmId`] and refuses one
//!   that does not with `DuplicateName`, so reruns after a crash never clone
//!   twice;
//! - per-step [`Delays`] slept on tokio time (tests can pause time); a clone
//!   that was started keeps running when the call that started it is
//!   dropped, and the next `create_vm` adopts and awaits it;
//! - guest IPs from a deterministic [`IpPool`] reported
//!   `Delays::ip_report` after power-on, or never ([`IpMode::Never`]), in
//!   which case `create_vm` waits out `spec.ip_wait_timeout` and returns
//!   the result without IP and with
//!   [`IP_TIMEOUT_WARNING`];
//! - guest customization ([`GuestCustomization`]): it runs a `duration`
//!   after power-on while the guest reports the template identity's
//!   address, then the guest's own address appears; `create_vm` waits for
//!   it (at most `spec.customization_timeout`; when that is zero, for no
//!   outcome: no fault rule applies, and the IP wait still sees the guest's
//!   own address only) before the IP wait, and a fault rule on
//!   [`Operation::Customize`] fails it (`VsphereError::CustomizationFailed`)
//!   or draws it out;
//! - fault injection by [`FaultRule`] (operation, trigger, fault) and
//!   introspection ([`Simulator::vms`], [`Simulator::call_count`]);
//! - power-off (hard, or a guest shutdown that takes
//!   [`Simulator::set_guest_shutdown`] and falls back to hard after the
//!   caller's timeout) and destroy, both only for a VM carrying the
//!   caller's dvmm id (`NotOurs` otherwise, `VmGone` for an unknown id);
//! - endpoint outages ([`Simulator::set_endpoint_down`],
//!   [`Simulator::set_endpoint_down_for_calls`]): calls to that vCenter URL
//!   fail with `VsphereError::Transport` (connection refused) without
//!   touching the inventory, as a vCenter that is restarting would, while
//!   other URLs served by the same simulator keep working.
//!
//! The VM appears in the inventory the moment its clone starts: on the first
//! poll of `create_vm`, after an injected [`Fault::Delay`]. Until its clone,
//! reconfigure, customize and power-on delays have passed it reads as
//! powered off. The spec's `endpoint` only matters for outages: one
//! simulator can stand for several vCenters, each known by its URL.
//!
//! ```
//! use dvmm_core::spec::{VmName, VmSpec};
//! use dvmm_core::{VmResources, VspherePort};
//! use dvmm_vsphere::sim::{Operation, Simulator};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! let sim = Simulator::default();
//! let config = sim.tenant_config("6f1c1d2e-0000-4000-8000-000000000001".parse()?, "acme")?;
//! let name = VmName::new("web", "app01")?;
//! let resources = VmResources { cpu: 2, memory_mib: 4096, disk_gib: 40 };
//! let spec = VmSpec::for_request(
//!     &config,
//!     "00000000-0000-4000-8000-00000000000a".parse()?,
//!     "00000000-0000-4000-8000-00000000000b".parse()?,
//!     &name,
//!     "web",
//!     resources,
//! );
//!
//! let result = runtime.block_on(sim.create_vm(&spec))?;
//! assert_eq!(result.vmware_vm_id.as_str(), "vm-1000");
//! assert_eq!(result.ip_address, Some("10.0.0.100".parse()?));
//! assert_eq!(result.hostname, "web-app01");
//!
//! // Creating it again adopts the same VM instead of cloning a second one.
//! let again = runtime.block_on(sim.create_vm(&spec))?;
//! assert_eq!(again.vmware_vm_id, result.vmware_vm_id);
//! let vms = sim.vms();
//! assert_eq!(vms.len(), 1);
//! assert_eq!(vms[0].folder_path, "acme/web");
//! assert_eq!(vms[0].resources, resources);
//! assert_eq!(sim.call_count(Operation::CreateVm), 2);
//! # Ok(())
//! # }
//! ```

mod config;
mod fault;
mod inventory;
mod model;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use dvmm_core::config::{
    ConfigError, Secret, TenantConfig, Timeouts, VcenterEndpoint, endpoint_key,
};
use dvmm_core::ports::{PowerOffMode, PowerOffOutcome, ProgressReporter, ProvisioningProgress};
use dvmm_core::spec::{IP_TIMEOUT_WARNING, PowerState, SizeTable, VmGuestInfo};
use dvmm_core::{
    TenantId, VcenterEndpoint as Endpoint, VmId, VmProvisioningResult, VmSpec, VmwareVmId,
    VsphereError, VspherePort,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

pub use config::{Delays, GuestCustomization, IpMode, IpPool, SimulatorConfig};
pub use fault::{Fault, FaultRule, Operation, Trigger};
pub use inventory::{
    DEFAULT_CLUSTER, DEFAULT_DATACENTER, DEFAULT_DATASTORE, DEFAULT_DATASTORE_FREE_GIB,
    DEFAULT_DISTRIBUTED_NETWORK, DEFAULT_NETWORK, DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_RESOURCES,
    Inventory, NetworkKind, SimCluster, SimDatacenter, SimDatastore, SimNetwork, SimTemplate,
};
pub use model::SimVm;

use model::{IpStatus, Outage, Placement, PowerView, Progress, State, later, normalize_folder};

/// The in-process vCenter. Cheap to clone: clones share one inventory.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes `create_vm` calls waiting for a VM when a test hook changes it.
    vm_changed: Notify,
}

impl Default for Simulator {
    fn default() -> Self {
        Self::new(SimulatorConfig::default())
    }
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Simulator")
            .field("vms", &state.vm_count())
            .field("ip_mode", &state.ip_mode())
            .field("create_vm_calls", &state.call_count(Operation::CreateVm))
            .field("get_vm_calls", &state.call_count(Operation::GetVm))
            .field("find_vm_calls", &state.call_count(Operation::FindVm))
            .finish_non_exhaustive()
    }
}

fn transient(message: &str) -> VsphereError {
    VsphereError::Transport {
        message: message.to_owned(),
    }
}

const TRANSIENT_MESSAGE: &str = "simulated transient failure: connection reset by peer";
const REFUSED_MESSAGE: &str = "simulated outage: connection refused";
const DROPPED_MESSAGE: &str = "simulated outage: the connection dropped while waiting for the VM";
const LOST_CHANGE_MESSAGE: &str = "simulated failure: connection lost after the change was made";
const LOST_ANSWER_MESSAGE: &str = "simulated failure: connection lost after the clone was started";

impl Simulator {
    /// A simulator with this inventory and behaviour, and no VMs.
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(&config)),
                vm_changed: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held, so a poisoned lock still
        // guards a consistent state.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a fault rule after the existing ones (the first matching rule
    /// decides a call's fault).
    pub fn add_fault(&self, rule: FaultRule) {
        tracing::debug!(?rule, "simulator: fault rule added");
        self.state().rules_mut().push(rule);
    }

    /// Takes the vCenter at `url` down until [`Simulator::set_endpoint_up`]:
    /// every call to it fails with [`VsphereError::Transport`], and
    /// `create_vm` calls waiting for a VM lose their connection the same
    /// way. What vCenter was doing goes on (a clone that was started
    /// finishes), and the next `create_vm` after the outage adopts it. URLs
    /// are compared by [`dvmm_core::config::endpoint_key`].
    pub fn set_endpoint_down(&self, url: &str) {
        tracing::debug!(url, "simulator: endpoint down");
        self.state()
            .set_outage(endpoint_key(url), Some(Outage::UntilUp));
        self.inner.vm_changed.notify_waiters();
    }

    /// Refuses the next `calls` new calls to `url` as
    /// [`Simulator::set_endpoint_down`] does, then serves it again. Calls
    /// already in progress are not cut.
    pub fn set_endpoint_down_for_calls(&self, url: &str, calls: u32) {
        tracing::debug!(url, calls, "simulator: endpoint down for a number of calls");
        self.state()
            .set_outage(endpoint_key(url), Some(Outage::Calls(calls)));
    }

    /// Ends an outage of `url`.
    pub fn set_endpoint_up(&self, url: &str) {
        tracing::debug!(url, "simulator: endpoint up");
        self.state().set_outage(endpoint_key(url), None);
    }

    /// Calls refused because their endpoint was down (they are counted in
    /// [`Simulator::call_count`] too).
    pub fn unreachable_calls(&self) -> u64 {
        self.state().unreachable_calls()
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state().rules_mut().clear();
    }

    /// Whether guests report an IP, for VMs powered on from now on (a VM
    /// keeps the behaviour it was booted with).
    pub fn set_ip_mode(&self, mode: IpMode) {
        self.state().set_ip_mode(mode);
    }

    /// The current [`IpMode`].
    pub fn ip_mode(&self) -> IpMode {
        self.state().ip_mode()
    }

    /// Replaces the step delays. Clones started from now on use them, and
    /// so do unfinished ones, as if vCenter had sped up or slowed down: a
    /// clone in progress powers on at its start plus the new
    /// `until_powered_on()` (at once if that has passed), and a guest that
    /// has not reported its IP yet reports it `ip_report` after power-on.
    /// `create_vm` calls waiting for such VMs follow the new plan.
    pub fn set_delays(&self, delays: Delays) {
        self.state().set_delays(delays, Instant::now());
        self.inner.vm_changed.notify_waiters();
    }

    /// Every VM (templates excluded), in creation order, as it is now.
    pub fn vms(&self) -> Vec<SimVm> {
        self.state().snapshot(Instant::now())
    }

    /// One VM as it is now.
    pub fn vm(&self, id: &VmwareVmId) -> Option<SimVm> {
        self.state().vm(id, Instant::now())
    }

    /// How often `operation` was called, faulted calls included.
    pub fn call_count(&self, operation: Operation) -> u64 {
        self.state().call_count(operation)
    }

    /// The guest reports `ip` from now on (`None`: no IP any more); VMware
    /// Tools counts as running from now. A `create_vm` waiting for this VM's
    /// IP sees it at once. An IPv6 address counts as no IP (dvmm reports
    /// IPv4), and a pool address the VM held goes back to the pool. Unknown
    /// ids are ignored.
    pub fn set_guest_ip(&self, id: &VmwareVmId, ip: Option<IpAddr>) {
        let known = self.state().set_guest_ip(id, ip, Instant::now());
        tracing::debug!(%id, ?ip, known, "simulator: guest IP set");
        self.inner.vm_changed.notify_waiters();
    }

    /// Powers a VM on (at once, without the power-on delay), off or
    /// suspends it, as an operator would in the vSphere client. Returns
    /// false when there is no such VM.
    pub fn set_power_state(&self, id: &VmwareVmId, state: PowerState) -> bool {
        let known = self.state().set_power_state(id, state, Instant::now());
        tracing::debug!(%id, ?state, known, "simulator: power state set");
        self.inner.vm_changed.notify_waiters();
        known
    }

    /// Deletes a VM, freeing its name and its pool IP. Returns false when
    /// there is no such VM.
    pub fn remove_vm(&self, id: &VmwareVmId) -> bool {
        let known = self.state().remove_vm(id);
        tracing::debug!(%id, known, "simulator: VM removed");
        self.inner.vm_changed.notify_waiters();
        known
    }

    /// How long a guest with VMware Tools running takes to shut down when
    /// `power_off_vm` asks it to (`None`: it never does, so the caller's
    /// timeout runs out and the VM is powered off hard). Default 2 s.
    pub fn set_guest_shutdown(&self, after: Option<std::time::Duration>) {
        self.state().set_guest_shutdown(after);
    }

    /// Adds a powered-on VM that dvmm did not create (it carries no dvmm
    /// id, has no IP) to `folder_path` of the first datacenter (one named
    /// `DC0` is added to an inventory without datacenters). If that folder
    /// already holds a VM of that name, nothing is added and that VM's id is
    /// returned.
    pub fn insert_foreign_vm(&self, folder_path: &str, name: &str) -> VmwareVmId {
        let id = self
            .state()
            .insert_foreign(folder_path, name, Instant::now());
        tracing::debug!(%id, folder_path, name, "simulator: foreign VM inserted");
        id
    }

    /// The VM folders of a datacenter (paths below its VM folder, sorted),
    /// including those created implicitly by `create_vm`.
    pub fn folders(&self, datacenter: &str) -> Vec<String> {
        self.state().folders(datacenter)
    }

    /// A valid tenant configuration that places VMs in this simulator: the
    /// first datacenter that has a cluster, datastore, network and template,
    /// with the first of each; default sizes and timeouts; a placeholder
    /// endpoint (the simulator ignores it).
    ///
    /// # Errors
    /// A [`ConfigError`] when no datacenter has all four, or `slug` is not a
    /// valid folder name.
    pub fn tenant_config(
        &self,
        tenant_id: TenantId,
        slug: &str,
    ) -> Result<TenantConfig, ConfigError> {
        let placement = self.state().default_placement();
        let Some([datacenter, cluster, datastore, network, template]) = placement else {
            return Err(ConfigError::new(
                "inventory",
                "no datacenter has a cluster, a datastore, a network and a template",
            ));
        };
        let config = TenantConfig {
            tenant_id,
            slug: slug.to_owned(),
            vcenter: simulator_endpoint(),
            datacenter,
            cluster,
            resource_pool: None,
            datastore,
            template,
            network,
            folder_root: None,
            sizes: SizeTable::default(),
            timeouts: Timeouts::default(),
            on_failure: Default::default(),
        };
        config.validate()?;
        Ok(config)
    }

    async fn create(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        let endpoint = endpoint_key(&spec.endpoint.url);
        let (fault, placed) = {
            let mut state = self.state();
            if state.refuse_call(Operation::CreateVm, &endpoint) {
                return Err(transient(REFUSED_MESSAGE));
            }
            let fault = state.begin(Operation::CreateVm);
            // The common case takes the lock once.
            let placed = match fault {
                None => Some(state.place(spec, Instant::now())),
                Some(_) => None,
            };
            (fault, placed)
        };
        let mut lose_answer = false;
        let mut fail_after_clone = None;
        let placed = match (fault, placed) {
            (_, Some(placed)) => placed,
            (Some(fault), None) => {
                tracing::debug!(?fault, "simulator: fault injected");
                match fault {
                    Fault::Error(error) => return Err(error),
                    Fault::Transient => return Err(transient(TRANSIENT_MESSAGE)),
                    Fault::DuplicateName => {
                        return Err(VsphereError::DuplicateName {
                            name: spec.name.as_str().to_owned(),
                            location: normalize_folder(&spec.folder_path).into_owned(),
                        });
                    }
                    Fault::CreatedButCallFailed => lose_answer = true,
                    Fault::ClonedThenFailed(error) => fail_after_clone = Some(error),
                    Fault::Delay(delay) => tokio::time::sleep(delay).await,
                }
                self.state().place(spec, Instant::now())
            }
            (None, None) => self.state().place(spec, Instant::now()),
        };
        let placement = placed?;
        if let Some(error) = fail_after_clone {
            let mut state = self.state();
            state.power_off(placement.number);
            tracing::debug!(vmware_vm_id = %placement.id, %error, "simulator: clone left powered off, call failed");
            return Err(error);
        }
        tracing::debug!(
            vmware_vm_id = %placement.id,
            adopted = placement.adopted,
            "simulator: {}",
            if placement.adopted { "adopting the existing VM" } else { "clone started" }
        );
        let result = |ip_address: Option<IpAddr>, placement: Placement| VmProvisioningResult {
            vmware_vm_id: placement.id,
            ip_address,
            hostname: spec.hostname.as_str().to_owned(),
            warning_message: ip_address.is_none().then(|| IP_TIMEOUT_WARNING.to_owned()),
        };
        if let (Some(ip), false) = (placement.ip_now, lose_answer) {
            return Ok(result(Some(ip), placement));
        }
        // Zero: the tenant does not wait for the customization outcome.
        if !spec.customization_timeout.is_zero() {
            progress(ProvisioningProgress::CustomizingGuest);
            self.wait_customized(placement.number, spec.customization_timeout, &endpoint)
                .await?;
        }
        let ip = self
            .wait_until_ready(
                placement.number,
                spec.ip_wait_timeout,
                lose_answer,
                &endpoint,
            )
            .await?;
        tracing::debug!(?ip, "simulator: VM ready");
        Ok(result(ip, placement))
    }

    /// Waits for the VM to power on, then up to `timeout` for the guest's
    /// IP; wakes when the next step is due or a test hook changed the VM
    /// (`set_delays`, `set_guest_ip`, …). With `lose_answer`, fails with a
    /// transport error once the VM is powered on; so does an outage of
    /// `endpoint`, at once.
    async fn wait_until_ready(
        &self,
        number: u64,
        timeout: std::time::Duration,
        lose_answer: bool,
        endpoint: &str,
    ) -> Result<Option<IpAddr>, VsphereError> {
        // The IP wait starts when the VM is first seen powered on.
        let mut deadline = None;
        loop {
            // Registered before reading the state, so a change between the
            // read and the wait is not missed.
            let mut changed = pin!(self.inner.vm_changed.notified());
            changed.as_mut().enable();
            let now = Instant::now();
            let progress = {
                let state = self.state();
                if state.is_down(endpoint) {
                    return Err(transient(DROPPED_MESSAGE));
                }
                state.progress(number, now)?
            };
            let wake = match progress {
                Progress::PoweringOn(at) => at,
                Progress::Running(_) if lose_answer => {
                    return Err(transient(LOST_ANSWER_MESSAGE));
                }
                Progress::Running(IpStatus::Reported(ip)) => return Ok(Some(ip)),
                Progress::Running(IpStatus::Pending(due)) => {
                    let deadline = *deadline.get_or_insert_with(|| later(now, timeout));
                    if now >= deadline {
                        return Ok(None);
                    }
                    due.map_or(deadline, |due| due.min(deadline))
                }
            };
            // Whatever woke us (the step is due, the deadline passed, the
            // VM changed), reading the state again tells what to do.
            let _ = tokio::time::timeout_at(wake, changed).await;
        }
    }

    /// Waits for the VM's guest customization to finish, at most `timeout`
    /// from power-on; a fault rule on [`Operation::Customize`] fails it or
    /// makes it longer.
    async fn wait_customized(
        &self,
        number: u64,
        timeout: std::time::Duration,
        endpoint: &str,
    ) -> Result<(), VsphereError> {
        let (fault, window) = {
            let mut state = self.state();
            let window = state.customization_window(number)?;
            // A VM whose customization is over (an adopted one) has its
            // outcome already: no new one to fail.
            let fault = (window.1 > Instant::now())
                .then(|| state.begin(Operation::Customize))
                .flatten();
            (fault, window)
        };
        let _ = window;
        match fault {
            None => {}
            Some(Fault::Error(error) | Fault::ClonedThenFailed(error)) => {
                tracing::debug!(%error, "simulator: customization fails");
                return Err(error);
            }
            Some(Fault::Transient | Fault::CreatedButCallFailed) => {
                return Err(transient(TRANSIENT_MESSAGE));
            }
            Some(Fault::DuplicateName) => {}
            Some(Fault::Delay(by)) => self.state().delay_customization(number, by),
        }
        loop {
            let mut changed = pin!(self.inner.vm_changed.notified());
            changed.as_mut().enable();
            let now = Instant::now();
            let (on, done) = {
                let state = self.state();
                if state.is_down(endpoint) {
                    return Err(transient(DROPPED_MESSAGE));
                }
                state.customization_window(number)?
            };
            let Some(on) = on else {
                // Powered off by a test hook: nothing runs the guest.
                return Ok(());
            };
            if now >= done {
                return Ok(());
            }
            let deadline = later(on, timeout);
            if now >= deadline && now >= on {
                return Err(VsphereError::CustomizationTimeout {
                    started: true,
                    waited_secs: timeout.as_secs(),
                });
            }
            let wake = if now < on { on } else { done.min(deadline) };
            let _ = tokio::time::timeout_at(wake, changed).await;
        }
    }

    fn begin_read(&self, operation: Operation, url: &str) -> Result<Option<Fault>, VsphereError> {
        let mut state = self.state();
        if state.refuse_call(operation, &endpoint_key(url)) {
            return Err(transient(REFUSED_MESSAGE));
        }
        let fault = state.begin(operation);
        if let Some(fault) = &fault {
            tracing::debug!(?fault, "simulator: fault injected");
        }
        Ok(fault)
    }

    async fn apply_read_fault(
        fault: Option<Fault>,
        name: &str,
        location: &str,
    ) -> Result<(), VsphereError> {
        match fault {
            None => Ok(()),
            Some(Fault::Error(error) | Fault::ClonedThenFailed(error)) => Err(error),
            Some(Fault::Transient | Fault::CreatedButCallFailed) => {
                Err(transient(TRANSIENT_MESSAGE))
            }
            Some(Fault::DuplicateName) => Err(VsphereError::DuplicateName {
                name: name.to_owned(),
                location: location.to_owned(),
            }),
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }

    async fn get(&self, endpoint: &Endpoint, id: &VmwareVmId) -> Result<VmGuestInfo, VsphereError> {
        let fault = self.begin_read(Operation::GetVm, &endpoint.url)?;
        if fault.is_some() {
            Self::apply_read_fault(fault, id.as_str(), "").await?;
        }
        self.state().guest_info(id, Instant::now())
    }

    /// Applies an injected fault of a call that changes a VM: `Ok(true)`
    /// when the change must happen and its answer then be lost.
    async fn begin_change(
        &self,
        operation: Operation,
        endpoint: &Endpoint,
        id: &VmwareVmId,
    ) -> Result<bool, VsphereError> {
        match self.begin_read(operation, &endpoint.url)? {
            Some(Fault::CreatedButCallFailed) => Ok(true),
            fault => {
                Self::apply_read_fault(fault, id.as_str(), "").await?;
                Ok(false)
            }
        }
    }

    fn lost_answer<T>(result: Result<T, VsphereError>) -> Result<T, VsphereError> {
        result?;
        Err(transient(LOST_CHANGE_MESSAGE))
    }

    async fn power_off(
        &self,
        endpoint: &Endpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        let lose_answer = self
            .begin_change(Operation::PowerOffVm, endpoint, id)
            .await?;
        let outcome = self.power_off_owned(id, owner, mode).await;
        if lose_answer {
            return Self::lost_answer(outcome);
        }
        outcome
    }

    async fn power_off_owned(
        &self,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        let (number, view, shutdown) = {
            let state = self.state();
            let number = state.owned(id, owner)?;
            let view = state.power_view(number, Instant::now());
            (number, view, state.guest_shutdown())
        };
        let outcome = match (view, mode) {
            (None, _) => {
                return Err(VsphereError::VmGone {
                    vmware_vm_id: id.as_str().to_owned(),
                });
            }
            (Some(PowerView::Off), _) => return Ok(PowerOffOutcome::AlreadyOff),
            (Some(PowerView::OnWithTools), PowerOffMode::Guest { timeout }) => {
                // The guest shuts down on its own time; past the caller's
                // timeout the power is cut, as the SOAP client does.
                match shutdown {
                    Some(after) if after <= timeout => {
                        tokio::time::sleep(after).await;
                        PowerOffOutcome::GuestShutdown
                    }
                    _ => {
                        tokio::time::sleep(timeout).await;
                        PowerOffOutcome::Hard
                    }
                }
            }
            _ => PowerOffOutcome::Hard,
        };
        let mut state = self.state();
        // The VM may have been removed or changed hands while the guest
        // was shutting down: check again before touching it.
        let number = match state.owned(id, owner) {
            Ok(again) if again == number => again,
            Ok(_) | Err(VsphereError::NotOurs { .. }) => {
                return Err(VsphereError::NotOurs {
                    vmware_vm_id: id.as_str().to_owned(),
                });
            }
            Err(e) => return Err(e),
        };
        state.power_off(number);
        drop(state);
        self.inner.vm_changed.notify_waiters();
        Ok(outcome)
    }

    async fn destroy(
        &self,
        endpoint: &Endpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        let lose_answer = self
            .begin_change(Operation::DestroyVm, endpoint, id)
            .await?;
        let result = {
            let mut state = self.state();
            state
                .owned(id, owner)
                .and_then(|number| state.destroy(number, Instant::now()))
        };
        self.inner.vm_changed.notify_waiters();
        if lose_answer {
            return Self::lost_answer(result);
        }
        result
    }

    async fn find(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        let fault = self.begin_read(Operation::FindVm, &spec.endpoint.url)?;
        if fault.is_some() {
            let folder = normalize_folder(&spec.folder_path);
            Self::apply_read_fault(fault, spec.name.as_str(), &folder).await?;
        }
        self.state().find(spec, Instant::now())
    }
}

fn simulator_endpoint() -> VcenterEndpoint {
    VcenterEndpoint {
        url: "https://simulator.invalid/sdk".into(),
        username: "dvmm-simulator".into(),
        password: Secret::new("simulator"),
        insecure: false,
        thumbprint: None,
        allow_plain_http: false,
    }
}

impl VspherePort for Simulator {
    fn create_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        self.create_vm_reporting(spec, &|_| {})
    }

    fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> impl Future<Output = Result<VmProvisioningResult, VsphereError>> + Send {
        let span = tracing::debug_span!(
            "sim.create_vm",
            vm = %spec.name,
            folder = %spec.folder_path,
            vm_id = %spec.vm_id,
        );
        self.create(spec, progress).instrument(span)
    }

    fn get_vm(
        &self,
        endpoint: &Endpoint,
        id: &VmwareVmId,
    ) -> impl Future<Output = Result<VmGuestInfo, VsphereError>> + Send {
        let span = tracing::debug_span!("sim.get_vm", vmware_vm_id = %id);
        self.get(endpoint, id).instrument(span)
    }

    fn find_vm(
        &self,
        spec: &VmSpec,
    ) -> impl Future<Output = Result<Option<VmGuestInfo>, VsphereError>> + Send {
        let span = tracing::debug_span!("sim.find_vm", vm = %spec.name, folder = %spec.folder_path);
        self.find(spec).instrument(span)
    }

    fn power_off_vm(
        &self,
        endpoint: &Endpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> impl Future<Output = Result<PowerOffOutcome, VsphereError>> + Send {
        let span = tracing::debug_span!("sim.power_off_vm", vmware_vm_id = %id, ?mode);
        self.power_off(endpoint, id, owner, mode).instrument(span)
    }

    fn destroy_vm(
        &self,
        endpoint: &Endpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> impl Future<Output = Result<(), VsphereError>> + Send {
        let span = tracing::debug_span!("sim.destroy_vm", vmware_vm_id = %id);
        self.destroy(endpoint, id, owner).instrument(span)
    }
}

#[cfg(test)]
mod tests;
