//! How a [`Simulator`](super::Simulator) behaves: inventory, delays, IP pool,
//! IP reporting and the fault RNG's seed.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::inventory::Inventory;

/// Everything that shapes a simulator. Start from [`Default`] and change
/// what the test needs:
///
/// ```
/// use std::time::Duration;
/// use dvmm_vsphere::sim::{Delays, IpMode, SimulatorConfig};
///
/// let config = SimulatorConfig {
///     delays: Delays { clone: Duration::from_secs(30), ..Delays::none() },
///     ip_mode: IpMode::Never,
///     ..SimulatorConfig::default()
/// };
/// assert_eq!(config.delays.until_powered_on(), Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorConfig {
    /// Datacenters, clusters, datastores, networks, templates, folders.
    pub inventory: Inventory,
    /// How long each step of a clone takes (all zero by default).
    pub delays: Delays,
    /// Where guest IPs come from.
    pub ip_pool: IpPool,
    /// Whether guests report an IP.
    pub ip_mode: IpMode,
    /// How the guest's customization plays out after power-on.
    pub customization: GuestCustomization,
    /// Seed of the RNG behind [`Trigger::Probability`](super::Trigger::Probability),
    /// so probabilistic faults hit the same calls on every run.
    pub seed: u64,
}

impl SimulatorConfig {
    /// The seed used by [`SimulatorConfig::default`].
    pub const DEFAULT_SEED: u64 = 0x0d76_6d6d_5eed;
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            inventory: Inventory::default(),
            delays: Delays::none(),
            ip_pool: IpPool::default(),
            ip_mode: IpMode::Report,
            customization: GuestCustomization::default(),
            seed: Self::DEFAULT_SEED,
        }
    }
}

/// Per-step durations of `create_vm`, slept on tokio time so tests can pause
/// and advance the clock. The steps run one after the other: clone,
/// reconfigure, customize, power on; the guest then reports its IP
/// `ip_report` after power-on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delays {
    /// `CloneVM_Task`.
    pub clone: Duration,
    /// `ReconfigVM_Task` (CPU, memory, disk, NIC).
    pub reconfigure: Duration,
    /// Guest customization (hostname, DHCP).
    pub customize: Duration,
    /// `PowerOnVM_Task`.
    pub power_on: Duration,
    /// From power-on until VMware Tools reports the guest's IP.
    pub ip_report: Duration,
}

impl Delays {
    /// No delay anywhere: every call completes without sleeping.
    pub const fn none() -> Self {
        Self {
            clone: Duration::ZERO,
            reconfigure: Duration::ZERO,
            customize: Duration::ZERO,
            power_on: Duration::ZERO,
            ip_report: Duration::ZERO,
        }
    }

    /// From the start of the clone until the VM is powered on.
    pub fn until_powered_on(&self) -> Duration {
        self.clone
            .saturating_add(self.reconfigure)
            .saturating_add(self.customize)
            .saturating_add(self.power_on)
    }
}

/// Guest customization as vCenter records it: it starts at power-on, runs
/// `duration` (while the guest keeps the template's identity and reports
/// `pre_customization_ip`), then the guest reboots with its own hostname and
/// its address from the pool, and vCenter records the success. A fault rule
/// on [`Operation::Customize`](super::Operation::Customize) makes it fail
/// ([`Fault::Error`](super::Fault::Error) with the error to return, e.g.
/// `VsphereError::CustomizationFailed`) or take longer
/// ([`Fault::Delay`](super::Fault::Delay); past the spec's
/// `customization_timeout` that is `VsphereError::CustomizationTimeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCustomization {
    /// From power-on until the outcome (zero by default).
    pub duration: Duration,
    /// The address the guest reports before customization reboots it
    /// (`None`: none).
    pub pre_customization_ip: Option<Ipv4Addr>,
}

impl Default for GuestCustomization {
    /// Instant, with `192.0.2.10` (TEST-NET-1) before it.
    fn default() -> Self {
        Self {
            duration: Duration::ZERO,
            pre_customization_ip: Some(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }
}

/// The range guest IPs are handed out from, like a DHCP scope: each new VM
/// gets the lowest free address; an address comes back when its VM is
/// removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPool {
    /// First address.
    pub start: Ipv4Addr,
    /// Number of addresses (capped where the IPv4 space ends).
    pub size: u32,
}

impl IpPool {
    /// How many addresses the pool really has.
    pub fn capacity(&self) -> u32 {
        let room = u32::MAX - u32::from(self.start);
        self.size.min(room.saturating_add(1))
    }
}

impl Default for IpPool {
    /// `10.0.0.100` onwards, 1000 addresses.
    fn default() -> Self {
        Self {
            start: Ipv4Addr::new(10, 0, 0, 100),
            size: 1000,
        }
    }
}

/// Whether guests report an IP address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IpMode {
    /// VMware Tools runs and reports an address from the pool
    /// `Delays::ip_report` after power-on.
    #[default]
    Report,
    /// VMware Tools never runs, so no IP is ever reported (until a test sets
    /// one with `Simulator::set_guest_ip`); `create_vm` waits out
    /// `VmSpec::ip_wait_timeout` and returns the IP-timeout warning.
    Never,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_capacity_stops_at_the_end_of_ipv4() {
        assert_eq!(IpPool::default().capacity(), 1000);
        let tail = IpPool {
            start: Ipv4Addr::new(255, 255, 255, 250),
            size: 100,
        };
        assert_eq!(tail.capacity(), 6);
        let all = IpPool {
            start: Ipv4Addr::new(0, 0, 0, 0),
            size: u32::MAX,
        };
        assert_eq!(all.capacity(), u32::MAX);
    }

    #[test]
    fn delays_add_up_without_overflow() {
        let d = Delays {
            clone: Duration::from_secs(1),
            reconfigure: Duration::from_secs(2),
            customize: Duration::from_secs(3),
            power_on: Duration::from_secs(4),
            ip_report: Duration::from_secs(100),
        };
        assert_eq!(d.until_powered_on(), Duration::from_secs(10));
        let huge = Delays {
            clone: Duration::MAX,
            power_on: Duration::MAX,
            ..Delays::none()
        };
        assert_eq!(huge.until_powered_on(), Duration::MAX);
        assert_eq!(Delays::none(), Delays::default());
    }
}
