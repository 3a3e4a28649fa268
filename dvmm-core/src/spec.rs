//! Value objects that describe the VM to build: its name, its size and the
//! full [`VmSpec`] handed to the vSphere port.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{MAX_IP_WAIT_SECS, MAX_TASK_SECS, TenantConfig, VcenterEndpoint};
use crate::ids::{TenantId, VmId, VmRequestId, VmwareVmId};

/// Longest DNS label (RFC 1123): the VM name is also the guest hostname.
pub const MAX_LABEL_LEN: usize = 63;

/// Which part of a VM name a [`NameError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamePart {
    /// The project prefix (`web` in `web-app01`).
    ProjectPrefix,
    /// The name the user asked for (`app01` in `web-app01`).
    RequestedName,
    /// The combined `{prefix}-{name}` label.
    FullName,
}

impl fmt::Display for NamePart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NamePart::ProjectPrefix => "project prefix",
            NamePart::RequestedName => "requested VM name",
            NamePart::FullName => "VM name",
        })
    }
}

/// Why a name is not a valid RFC 1123 DNS label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The part is empty.
    #[error("{part} must not be empty")]
    Empty {
        /// Which part.
        part: NamePart,
    },
    /// The part or the whole name is longer than a DNS label may be.
    #[error(
        "{part} {value:?} is {len} characters long, but at most {max} are allowed here (the whole VM name is a DNS label of at most {MAX_LABEL_LEN} characters)"
    )]
    TooLong {
        /// Which part.
        part: NamePart,
        /// The offending value.
        value: String,
        /// Its length.
        len: usize,
        /// The limit that applied to it.
        max: usize,
    },
    /// A character outside lowercase `a-z`, `0-9` and `-`.
    #[error(
        "{part} {value:?} contains {found:?} at position {index}; only lowercase letters a-z, digits 0-9 and '-' are allowed"
    )]
    InvalidCharacter {
        /// Which part.
        part: NamePart,
        /// The offending value.
        value: String,
        /// The first bad character.
        found: char,
        /// Its character index.
        index: usize,
    },
    /// Starts or ends with a hyphen.
    #[error("{part} {value:?} must not start or end with '-'")]
    EdgeHyphen {
        /// Which part.
        part: NamePart,
        /// The offending value.
        value: String,
    },
}

impl NameError {
    /// Which part of the name is wrong.
    pub fn part(&self) -> NamePart {
        match self {
            NameError::Empty { part }
            | NameError::TooLong { part, .. }
            | NameError::InvalidCharacter { part, .. }
            | NameError::EdgeHyphen { part, .. } => *part,
        }
    }
}

fn check_label(value: &str, part: NamePart, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { part });
    }
    if let Some((index, found)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(NameError::InvalidCharacter {
            part,
            value: value.to_owned(),
            found,
            index,
        });
    }
    // Only ASCII is left, so byte length is character length.
    if value.len() > max {
        return Err(NameError::TooLong {
            part,
            value: value.to_owned(),
            len: value.len(),
            max,
        });
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(NameError::EdgeHyphen {
            part,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// A VM name `{projectPrefix}-{requestedName}`, used as the vSphere VM name and
/// as the guest hostname: always a valid RFC 1123 DNS label (1–63 characters,
/// lowercase `a-z0-9-`, no leading or trailing hyphen).
///
/// ```
/// use dvmm_core::spec::{VmName, NamePart};
///
/// let name = VmName::new("web", "app01").unwrap();
/// assert_eq!(name.as_str(), "web-app01");
///
/// let err = VmName::new("web", "App01").unwrap_err();
/// assert_eq!(err.part(), NamePart::RequestedName);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Builds `{prefix}-{requested}`, validating each part on its own so the
    /// error says which one is wrong.
    ///
    /// # Errors
    /// A [`NameError`] naming the part ([`NamePart`]) that breaks the rules.
    pub fn new(project_prefix: &str, requested_name: &str) -> Result<Self, NameError> {
        // The prefix needs room for "-x" after it.
        check_label(
            project_prefix,
            NamePart::ProjectPrefix,
            MAX_LABEL_LEN.saturating_sub(2),
        )?;
        let room = MAX_LABEL_LEN - project_prefix.len() - 1;
        check_label(requested_name, NamePart::RequestedName, room)?;
        Ok(Self(format!("{project_prefix}-{requested_name}")))
    }

    /// Validates an already combined name (for names read back from storage).
    ///
    /// # Errors
    /// A [`NameError`] for [`NamePart::FullName`].
    pub fn parse(full: &str) -> Result<Self, NameError> {
        check_label(full, NamePart::FullName, MAX_LABEL_LEN)?;
        Ok(Self(full.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = NameError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<VmName> for String {
    fn from(name: VmName) -> Self {
        name.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A named VM size. What each size means is configuration ([`SizeTable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VmSize {
    /// Small.
    S,
    /// Medium.
    M,
    /// Large.
    L,
    /// Extra large.
    XL,
}

impl VmSize {
    /// Every size, smallest first.
    pub const ALL: [VmSize; 4] = [VmSize::S, VmSize::M, VmSize::L, VmSize::XL];

    /// The size's name (`"S"`, `"M"`, `"L"`, `"XL"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            VmSize::S => "S",
            VmSize::M => "M",
            VmSize::L => "L",
            VmSize::XL => "XL",
        }
    }
}

impl fmt::Display for VmSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the known sizes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM size {0:?}; expected one of S, M, L, XL")]
pub struct UnknownSize(pub String);

impl FromStr for VmSize {
    type Err = UnknownSize;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "S" => Ok(VmSize::S),
            "M" => Ok(VmSize::M),
            "L" => Ok(VmSize::L),
            "XL" => Ok(VmSize::XL),
            _ => Err(UnknownSize(s.to_owned())),
        }
    }
}

/// Limits that keep a size sane: vSphere accepts more, but a value outside
/// these is almost certainly a typo in configuration.
pub mod limits {
    /// Most vCPUs a size may have.
    pub const MAX_CPU: u32 = 256;
    /// Fewest MiB of memory.
    pub const MIN_MEMORY_MIB: u64 = 256;
    /// Most MiB of memory (24 TiB, vSphere 8's maximum).
    pub const MAX_MEMORY_MIB: u64 = 24 * 1024 * 1024;
    /// Most GiB of disk (62 TiB, the VMDK maximum).
    pub const MAX_DISK_GIB: u64 = 62 * 1024;
}

/// CPU, memory and disk of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmResources {
    /// Number of virtual CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Size of the first disk in GiB.
    pub disk_gib: u64,
}

/// A resource value is zero, absurd, or not accepted by vSphere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    /// The field, e.g. `cpu` or `sizes.M.memory_mib`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl VmResources {
    /// Checks the values; `field_prefix` (e.g. `sizes.M`) goes into the error.
    ///
    /// # Errors
    /// A [`ResourceError`] naming the bad field.
    pub fn validate(&self, field_prefix: &str) -> Result<(), ResourceError> {
        let field = |name: &str| {
            if field_prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{field_prefix}.{name}")
            }
        };
        if self.cpu == 0 || self.cpu > limits::MAX_CPU {
            return Err(ResourceError {
                field: field("cpu"),
                reason: format!(
                    "must be between 1 and {}, got {}",
                    limits::MAX_CPU,
                    self.cpu
                ),
            });
        }
        if !(limits::MIN_MEMORY_MIB..=limits::MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ResourceError {
                field: field("memory_mib"),
                reason: format!(
                    "must be between {} and {} MiB, got {}",
                    limits::MIN_MEMORY_MIB,
                    limits::MAX_MEMORY_MIB,
                    self.memory_mib
                ),
            });
        }
        if !self.memory_mib.is_multiple_of(4) {
            return Err(ResourceError {
                field: field("memory_mib"),
                reason: format!("must be a multiple of 4 MiB, got {}", self.memory_mib),
            });
        }
        if self.disk_gib == 0 || self.disk_gib > limits::MAX_DISK_GIB {
            return Err(ResourceError {
                field: field("disk_gib"),
                reason: format!(
                    "must be between 1 and {} GiB, got {}",
                    limits::MAX_DISK_GIB,
                    self.disk_gib
                ),
            });
        }
        Ok(())
    }
}

/// What each [`VmSize`] means. Defaults: S = 1 vCPU / 2048 MiB / 20 GiB,
/// M = 2 / 4096 / 40, L = 4 / 8192 / 80, XL = 8 / 16384 / 160.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SizeTable(BTreeMap<VmSize, VmResources>);

impl Default for SizeTable {
    fn default() -> Self {
        let r = |cpu, memory_mib, disk_gib| VmResources {
            cpu,
            memory_mib,
            disk_gib,
        };
        Self(BTreeMap::from([
            (VmSize::S, r(1, 2048, 20)),
            (VmSize::M, r(2, 4096, 40)),
            (VmSize::L, r(4, 8192, 80)),
            (VmSize::XL, r(8, 16384, 160)),
        ]))
    }
}

impl SizeTable {
    /// The defaults with the given sizes replaced.
    ///
    /// # Errors
    /// A [`ResourceError`] naming `sizes.<SIZE>.<field>` when a value is bad.
    pub fn with_overrides(
        overrides: impl IntoIterator<Item = (VmSize, VmResources)>,
    ) -> Result<Self, ResourceError> {
        let mut table = Self::default();
        for (size, resources) in overrides {
            resources.validate(&format!("sizes.{size}"))?;
            table.0.insert(size, resources);
        }
        Ok(table)
    }

    /// The resources of a size.
    pub fn resources(&self, size: VmSize) -> VmResources {
        // Every size is present: the table starts from the full default set.
        self.0
            .get(&size)
            .copied()
            .unwrap_or_else(|| SizeTable::default().0[&size])
    }
}

impl<'de> Deserialize<'de> for SizeTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let overrides = BTreeMap::<VmSize, VmResources>::deserialize(deserializer)?;
        SizeTable::with_overrides(overrides).map_err(serde::de::Error::custom)
    }
}

/// Everything the vSphere port needs to create (or find) one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    /// The tenant the VM belongs to.
    pub tenant_id: TenantId,
    /// The request this VM fulfils.
    pub request_id: VmRequestId,
    /// dvmm's id of the VM, written into the vSphere VM (extraConfig
    /// `dvmm.vmId`) so a rerun adopts only a VM it created itself.
    pub vm_id: VmId,
    /// VM name in vSphere.
    pub name: VmName,
    /// Guest hostname (the same label as the name).
    pub hostname: VmName,
    /// CPU, memory and disk.
    pub resources: VmResources,
    /// Template to clone from (name or inventory path).
    pub template: String,
    /// Network (standard or distributed port group) for the first NIC.
    pub network: String,
    /// Folder path below the datacenter's VM folder, e.g. `acme/web`.
    pub folder_path: String,
    /// Datacenter name.
    pub datacenter: String,
    /// Cluster name (its root resource pool is used) or, when
    /// [`VmSpec::resource_pool`] is set, the cluster that holds that pool.
    pub cluster: String,
    /// Optional resource pool path below the cluster.
    pub resource_pool: Option<String>,
    /// Datastore name.
    pub datastore: String,
    /// How long to wait for VMware Tools and an IPv4 address.
    pub ip_wait_timeout: Duration,
    /// How long one vSphere task (clone, reconfigure, customize, power-on)
    /// may run before it counts as timed out.
    pub task_timeout: Duration,
    /// Which vCenter, with which credentials.
    pub endpoint: VcenterEndpoint,
}

impl VmSpec {
    /// Builds the spec of a request's VM from the tenant's configuration.
    pub fn for_request(
        config: &TenantConfig,
        request_id: VmRequestId,
        vm_id: VmId,
        name: &VmName,
        project_prefix: &str,
        resources: VmResources,
    ) -> Self {
        let folder_path = match config.folder_root.as_deref() {
            Some(root) if !root.is_empty() => {
                format!("{root}/{}/{project_prefix}", config.slug)
            }
            _ => format!("{}/{project_prefix}", config.slug),
        };
        Self {
            tenant_id: config.tenant_id,
            request_id,
            vm_id,
            name: name.clone(),
            hostname: name.clone(),
            resources,
            template: config.template.clone(),
            network: config.network.clone(),
            folder_path,
            datacenter: config.datacenter.clone(),
            cluster: config.cluster.clone(),
            resource_pool: config.resource_pool.clone(),
            datastore: config.datastore.clone(),
            ip_wait_timeout: config.timeouts.ip_wait(),
            task_timeout: config.timeouts.task(),
            endpoint: config.vcenter.clone(),
        }
    }
}

/// Where and how a VM is built: everything of a [`VmSpec`] that comes from
/// the tenant's configuration, except the credentials. The VM stream records
/// it when provisioning starts, so that a resume builds the VM it started
/// (and adopts it) even when the configuration changed in between:
/// configuration changes apply to new provisionings only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlacement {
    /// The vCenter's SDK URL; the credentials are looked up by it in the
    /// tenant's configuration when the spec is rebuilt.
    pub endpoint_url: String,
    /// Datacenter name.
    pub datacenter: String,
    /// Cluster name.
    pub cluster: String,
    /// Resource pool path below the cluster, if any.
    pub resource_pool: Option<String>,
    /// Datastore name.
    pub datastore: String,
    /// Network of the first NIC.
    pub network: String,
    /// Template to clone from.
    pub template: String,
    /// Folder path below the datacenter's VM folder.
    pub folder_path: String,
    /// Guest hostname.
    pub hostname: VmName,
    /// IP wait in seconds.
    pub ip_wait_secs: u64,
    /// Task timeout in seconds.
    pub task_secs: u64,
}

impl VmSpec {
    /// What of this spec is recorded when provisioning starts.
    pub fn placement(&self) -> VmPlacement {
        VmPlacement {
            endpoint_url: self.endpoint.url.clone(),
            datacenter: self.datacenter.clone(),
            cluster: self.cluster.clone(),
            resource_pool: self.resource_pool.clone(),
            datastore: self.datastore.clone(),
            network: self.network.clone(),
            template: self.template.clone(),
            folder_path: self.folder_path.clone(),
            hostname: self.hostname.clone(),
            ip_wait_secs: self.ip_wait_timeout.as_secs(),
            task_secs: self.task_timeout.as_secs(),
        }
    }

    /// Rebuilds the spec of a VM whose provisioning started with
    /// `placement`. `endpoint` supplies the credentials and TLS settings;
    /// its URL is replaced by the recorded one. The timeouts are capped as
    /// a tenant's are ([`crate::config::Timeouts`]), whatever was recorded.
    pub fn from_placement(
        placement: &VmPlacement,
        endpoint: &VcenterEndpoint,
        tenant_id: TenantId,
        request_id: VmRequestId,
        vm_id: VmId,
        name: &VmName,
        resources: VmResources,
    ) -> Self {
        Self {
            tenant_id,
            request_id,
            vm_id,
            name: name.clone(),
            hostname: placement.hostname.clone(),
            resources,
            template: placement.template.clone(),
            network: placement.network.clone(),
            folder_path: placement.folder_path.clone(),
            datacenter: placement.datacenter.clone(),
            cluster: placement.cluster.clone(),
            resource_pool: placement.resource_pool.clone(),
            datastore: placement.datastore.clone(),
            ip_wait_timeout: Duration::from_secs(placement.ip_wait_secs.min(MAX_IP_WAIT_SECS)),
            task_timeout: Duration::from_secs(placement.task_secs.min(MAX_TASK_SECS)),
            endpoint: VcenterEndpoint {
                url: placement.endpoint_url.clone(),
                ..endpoint.clone()
            },
        }
    }
}

/// What `create_vm` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProvisioningResult {
    /// vSphere's managed-object id of the new VM.
    pub vmware_vm_id: VmwareVmId,
    /// The guest's IPv4 address, if VMware Tools reported one in time.
    pub ip_address: Option<IpAddr>,
    /// The guest hostname.
    pub hostname: String,
    /// Set when the VM is ready but something is incomplete (e.g.
    /// `"IP detection timed out"`).
    pub warning_message: Option<String>,
}

/// The warning a VM carries when VMware Tools did not report an IP in time.
pub const IP_TIMEOUT_WARNING: &str = "IP detection timed out";

/// Power state of a VM as vSphere reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    /// Running.
    PoweredOn,
    /// Stopped.
    PoweredOff,
    /// Suspended.
    Suspended,
}

/// Live facts about a VM, read from vSphere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmGuestInfo {
    /// Managed-object id.
    pub vmware_vm_id: VmwareVmId,
    /// VM name.
    pub name: String,
    /// dvmm's id as written into the VM, when there is one.
    pub dvmm_vm_id: Option<VmId>,
    /// Power state.
    pub power_state: PowerState,
    /// Whether VMware Tools is running in the guest.
    pub tools_running: bool,
    /// The guest's primary usable IPv4 address, if reported.
    pub ip_address: Option<IpAddr>,
    /// The guest hostname, if reported.
    pub hostname: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_wrong_part() {
        assert_eq!(
            VmName::new("Web", "app").unwrap_err().part(),
            NamePart::ProjectPrefix
        );
        assert_eq!(
            VmName::new("web", "app_1").unwrap_err().part(),
            NamePart::RequestedName
        );
        assert_eq!(
            VmName::new("", "app").unwrap_err(),
            NameError::Empty {
                part: NamePart::ProjectPrefix
            }
        );
        let long = "a".repeat(60);
        let err = VmName::new("web", &long).unwrap_err();
        assert_eq!(err.part(), NamePart::RequestedName);
        assert!(err.to_string().contains("at most 59"), "{err}");
        assert!(VmName::new("web", "-x").is_err());
        assert!(VmName::new("web", "x-").is_err());
        assert!(VmName::new("web", "é").is_err());
    }

    #[test]
    fn longest_name_is_63() {
        let name = VmName::new("ab", &"c".repeat(60)).unwrap();
        assert_eq!(name.as_str().len(), 63);
        assert!(VmName::new("ab", &"c".repeat(61)).is_err());
    }

    #[test]
    fn name_deserialization_validates() {
        assert!(serde_json::from_str::<VmName>("\"web-app01\"").is_ok());
        assert!(serde_json::from_str::<VmName>("\"Web-App01\"").is_err());
    }

    #[test]
    fn sizes_parse_case_insensitively_and_reject_unknown() {
        assert_eq!("m".parse::<VmSize>().unwrap(), VmSize::M);
        assert_eq!("XL".parse::<VmSize>().unwrap(), VmSize::XL);
        let err = "XXL".parse::<VmSize>().unwrap_err();
        assert!(err.to_string().contains("S, M, L, XL"));
    }

    #[test]
    fn default_size_table_matches_the_documented_one() {
        let t = SizeTable::default();
        let m = t.resources(VmSize::M);
        assert_eq!((m.cpu, m.memory_mib, m.disk_gib), (2, 4096, 40));
        let xl = t.resources(VmSize::XL);
        assert_eq!((xl.cpu, xl.memory_mib, xl.disk_gib), (8, 16384, 160));
    }

    #[test]
    fn absurd_resources_are_rejected_with_the_field() {
        let err = SizeTable::with_overrides([(
            VmSize::S,
            VmResources {
                cpu: 0,
                memory_mib: 2048,
                disk_gib: 20,
            },
        )])
        .unwrap_err();
        assert_eq!(err.field, "sizes.S.cpu");
        let err = VmResources {
            cpu: 1,
            memory_mib: 1001,
            disk_gib: 1,
        }
        .validate("")
        .unwrap_err();
        assert_eq!(err.field, "memory_mib");
    }
}
