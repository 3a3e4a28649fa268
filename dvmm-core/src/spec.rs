//! Value objects that describe the VM to build: its name and the full
//! [`VmSpec`] handed to the vSphere port (sizes live in [`crate::size`]).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{
    MAX_CUSTOMIZATION_SECS, MAX_IP_WAIT_SECS, MAX_TASK_SECS, TenantConfig, Timeouts,
    VcenterEndpoint,
};
use crate::ids::{TenantId, VmId, VmRequestId, VmwareVmId};

pub use crate::size::{ResourceError, SizeTable, UnknownSize, VmResources, VmSize, limits};

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
        f.pad(match self {
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
        f.pad(&self.0)
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
    /// How long guest customization may take after power-on before the
    /// provisioning fails (the IP wait starts after it succeeded). Zero:
    /// do not wait for the customization outcome (see
    /// [`crate::config::Timeouts::customization_secs`]).
    pub customization_timeout: Duration,
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
            customization_timeout: config.timeouts.customization(),
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
    /// Customization wait in seconds (zero: no wait for the outcome);
    /// always recorded now.
    ///
    /// `None` for a start recorded before this field existed (and left out
    /// when writing, so such a stored event reads back as it was written).
    /// [`VmSpec::from_placement`] then uses the default
    /// ([`Timeouts::default`], 600 s), not the tenant's current setting: it is
    /// handed the endpoint only, not the tenant's configuration, and the
    /// default is what every resume of such a provisioning used until then,
    /// so it keeps resuming as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customization_secs: Option<u64>,
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
            customization_secs: Some(self.customization_timeout.as_secs()),
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
            customization_timeout: match placement.customization_secs {
                Some(secs) => Duration::from_secs(secs.min(MAX_CUSTOMIZATION_SECS)),
                None => Timeouts::default().customization(),
            },
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

/// The warning a VM carries when the guest reports another hostname than the
/// one requested (customization succeeded, but the guest renamed itself or
/// the template overrides it).
pub fn hostname_mismatch_warning(requested: &str, reported: &str) -> String {
    format!("the guest reports hostname {reported:?} instead of the requested {requested:?}")
}

/// Joins warnings into one [`VmProvisioningResult::warning_message`].
pub fn join_warnings(warnings: impl IntoIterator<Item = String>) -> Option<String> {
    let all: Vec<String> = warnings.into_iter().filter(|w| !w.is_empty()).collect();
    (!all.is_empty()).then(|| all.join("; "))
}

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

    fn placement_json(customization: Option<u64>) -> serde_json::Value {
        let mut json = serde_json::json!({
            "endpoint_url": "https://vc.example.com/sdk",
            "datacenter": "DC0",
            "cluster": "DC0_C0",
            "resource_pool": null,
            "datastore": "LocalDS_0",
            "network": "VM Network",
            "template": "ubuntu",
            "folder_path": "acme/web",
            "hostname": "web-app01",
            "ip_wait_secs": 120,
            "task_secs": 1800
        });
        if let Some(secs) = customization {
            json["customization_secs"] = secs.into();
        }
        json
    }

    fn rebuilt(placement: &VmPlacement) -> VmSpec {
        let endpoint = VcenterEndpoint {
            url: "https://other.example.com/sdk".into(),
            username: "svc".into(),
            password: crate::config::Secret::new("pw"),
            insecure: false,
            thumbprint: None,
            allow_plain_http: false,
        };
        VmSpec::from_placement(
            placement,
            &endpoint,
            TenantId::from_uuid(uuid::Uuid::new_v4()),
            VmRequestId::from_uuid(uuid::Uuid::new_v4()),
            VmId::from_uuid(uuid::Uuid::new_v4()),
            &placement.hostname,
            VmResources {
                cpu: 2,
                memory_mib: 4096,
                disk_gib: 40,
            },
        )
    }

    #[test]
    fn the_recorded_customization_wait_is_resumed_with_capped_and_defaults_when_unrecorded() {
        let recorded: VmPlacement = serde_json::from_value(placement_json(Some(45))).unwrap();
        assert_eq!(recorded.customization_secs, Some(45));
        let spec = rebuilt(&recorded);
        assert_eq!(spec.customization_timeout, Duration::from_secs(45));
        assert_eq!(spec.placement(), recorded, "the spec records it again");
        let none: VmPlacement = serde_json::from_value(placement_json(Some(0))).unwrap();
        assert_eq!(rebuilt(&none).customization_timeout, Duration::ZERO);
        let huge: VmPlacement = serde_json::from_value(placement_json(Some(u64::MAX))).unwrap();
        assert_eq!(
            rebuilt(&huge).customization_timeout,
            Duration::from_secs(MAX_CUSTOMIZATION_SECS)
        );
        let json = placement_json(None);
        let old: VmPlacement = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.customization_secs, None);
        assert_eq!(
            rebuilt(&old).customization_timeout,
            Timeouts::default().customization()
        );
        assert_eq!(
            serde_json::to_value(&old).unwrap(),
            json,
            "an old start is written back as it was"
        );
    }

    #[test]
    fn name_deserialization_validates() {
        assert!(serde_json::from_str::<VmName>("\"web-app01\"").is_ok());
        assert!(serde_json::from_str::<VmName>("\"Web-App01\"").is_err());
    }
}
