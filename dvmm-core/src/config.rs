//! Per-tenant configuration: which vCenter, where VMs go, how big each size
//! is and how long to wait. Deserializable from TOML or JSON and validated on
//! load, with errors that name the bad field.
//!
//! ```
//! use dvmm_core::config::TenantConfig;
//!
//! let config: TenantConfig = serde_json::from_str(r#"{
//!     "tenant_id": "6f1c1d2e-0000-4000-8000-000000000001",
//!     "slug": "acme",
//!     "vcenter": { "url": "https://vc.example.com/sdk", "username": "svc-dvmm", "password": "s3cret" },
//!     "datacenter": "DC0", "cluster": "DC0_C0", "datastore": "LocalDS_0",
//!     "template": "ubuntu-22.04", "network": "VM Network"
//! }"#).unwrap();
//! assert_eq!(config.timeouts.ip_wait_secs, 120);
//! assert!(!format!("{config:?}").contains("s3cret"));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::TenantId;
use crate::spec::SizeTable;

/// A secret string (a password). Its `Debug` and `Display` print `***`; it
/// deserializes but never serializes, so it cannot leak into logs or events.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How to reach a vCenter and prove who we are.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterEndpoint {
    /// SDK URL, e.g. `https://vc.example.com/sdk`.
    pub url: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: Secret,
    /// Skip certificate verification (only for labs).
    #[serde(default)]
    pub insecure: bool,
    /// Accept exactly the certificate with this SHA-256 fingerprint (hex,
    /// colons optional), e.g. for vCenter's self-signed certificate.
    #[serde(default)]
    pub thumbprint: Option<String>,
}

/// Timeouts of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long to wait for VMware Tools and an IP (default 120 s).
    #[serde(default = "Timeouts::default_ip_wait_secs")]
    pub ip_wait_secs: u64,
    /// How long one vSphere task (clone, reconfigure, power-on) may take
    /// (default 1800 s).
    #[serde(default = "Timeouts::default_task_secs")]
    pub task_secs: u64,
}

impl Timeouts {
    fn default_ip_wait_secs() -> u64 {
        120
    }
    fn default_task_secs() -> u64 {
        1800
    }

    /// The IP wait as a duration.
    pub fn ip_wait(&self) -> Duration {
        Duration::from_secs(self.ip_wait_secs)
    }

    /// The task timeout as a duration.
    pub fn task(&self) -> Duration {
        Duration::from_secs(self.task_secs)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            ip_wait_secs: Self::default_ip_wait_secs(),
            task_secs: Self::default_task_secs(),
        }
    }
}

/// A configuration value is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The dotted path of the bad field, e.g. `vcenter.url`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Everything dvmm needs to know about one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawTenantConfig")]
pub struct TenantConfig {
    /// The tenant's id.
    pub tenant_id: TenantId,
    /// Short name, used as the tenant's folder name (`{slug}/{project}`).
    pub slug: String,
    /// The tenant's vCenter.
    pub vcenter: VcenterEndpoint,
    /// Datacenter name.
    pub datacenter: String,
    /// Cluster name.
    pub cluster: String,
    /// Optional resource pool path below the cluster.
    pub resource_pool: Option<String>,
    /// Datastore name.
    pub datastore: String,
    /// Template VM to clone (Linux).
    pub template: String,
    /// The tenant's default network.
    pub network: String,
    /// Optional folder below the datacenter's VM folder that holds all tenant
    /// folders (e.g. `dvmm`).
    pub folder_root: Option<String>,
    /// What S, M, L, XL mean for this tenant.
    pub sizes: SizeTable,
    /// Timeouts.
    pub timeouts: Timeouts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantConfig {
    tenant_id: TenantId,
    slug: String,
    vcenter: VcenterEndpoint,
    datacenter: String,
    cluster: String,
    #[serde(default)]
    resource_pool: Option<String>,
    datastore: String,
    template: String,
    network: String,
    #[serde(default)]
    folder_root: Option<String>,
    #[serde(default)]
    sizes: Option<SizeTable>,
    #[serde(default)]
    timeouts: Timeouts,
}

fn non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn folder_component(field: &str, value: &str) -> Result<(), ConfigError> {
    non_empty(field, value)?;
    if value.len() > 80 {
        return Err(ConfigError::new(field, "must be at most 80 characters"));
    }
    if value.contains(['/', '\\', '%']) || value.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            format!("{value:?} must not contain '/', '\\', '%' or control characters"),
        ));
    }
    Ok(())
}

impl TryFrom<RawTenantConfig> for TenantConfig {
    type Error = ConfigError;

    fn try_from(raw: RawTenantConfig) -> Result<Self, Self::Error> {
        let config = TenantConfig {
            tenant_id: raw.tenant_id,
            slug: raw.slug,
            vcenter: raw.vcenter,
            datacenter: raw.datacenter,
            cluster: raw.cluster,
            resource_pool: raw.resource_pool,
            datastore: raw.datastore,
            template: raw.template,
            network: raw.network,
            folder_root: raw.folder_root,
            sizes: raw.sizes.unwrap_or_default(),
            timeouts: raw.timeouts,
        };
        config.validate()?;
        Ok(config)
    }
}

impl TenantConfig {
    /// Checks every field; deserialization calls this, so a loaded
    /// configuration is always valid.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        folder_component("slug", &self.slug)?;
        let url = self.vcenter.url.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ConfigError::new(
                "vcenter.url",
                format!("{url:?} must be an http(s) URL such as https://vc.example.com/sdk"),
            ));
        }
        if url.len() <= "https://".len() {
            return Err(ConfigError::new("vcenter.url", "has no host"));
        }
        non_empty("vcenter.username", &self.vcenter.username)?;
        non_empty("vcenter.password", self.vcenter.password.expose())?;
        if let Some(thumbprint) = &self.vcenter.thumbprint {
            let hex: String = thumbprint.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::new(
                    "vcenter.thumbprint",
                    "must be a SHA-256 fingerprint: 64 hex digits, colons optional",
                ));
            }
        }
        non_empty("datacenter", &self.datacenter)?;
        non_empty("cluster", &self.cluster)?;
        if let Some(pool) = &self.resource_pool {
            non_empty("resource_pool", pool)?;
        }
        non_empty("datastore", &self.datastore)?;
        non_empty("template", &self.template)?;
        non_empty("network", &self.network)?;
        if let Some(root) = &self.folder_root {
            for part in root.split('/').filter(|p| !p.is_empty()) {
                folder_component("folder_root", part)?;
            }
        }
        if self.timeouts.ip_wait_secs > 3600 {
            return Err(ConfigError::new(
                "timeouts.ip_wait_secs",
                "must be at most 3600 seconds",
            ));
        }
        if self.timeouts.task_secs == 0 || self.timeouts.task_secs > 24 * 3600 {
            return Err(ConfigError::new(
                "timeouts.task_secs",
                "must be between 1 and 86400 seconds",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSize;

    const GOOD: &str = r#"
tenant_id = "6f1c1d2e-0000-4000-8000-000000000001"
slug = "acme"
datacenter = "DC0"
cluster = "DC0_C0"
datastore = "LocalDS_0"
template = "ubuntu-22.04"
network = "VM Network"

[vcenter]
url = "https://vc.example.com/sdk"
username = "svc-dvmm"
password = "hunter2"
thumbprint = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99"

[sizes.M]
cpu = 3
memory_mib = 6144
disk_gib = 60

[timeouts]
ip_wait_secs = 30
"#;

    #[test]
    fn loads_toml_with_overrides_and_defaults() {
        let config: TenantConfig = toml::from_str(GOOD).unwrap();
        assert_eq!(config.sizes.resources(VmSize::M).cpu, 3);
        assert_eq!(config.sizes.resources(VmSize::S).cpu, 1);
        assert_eq!(config.timeouts.ip_wait_secs, 30);
        assert_eq!(config.timeouts.task_secs, 1800);
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(***)"));
    }

    #[test]
    fn the_tenants_timeouts_reach_the_vm_spec() {
        let mut config: TenantConfig = toml::from_str(GOOD).unwrap();
        config.timeouts.task_secs = 90;
        let name = crate::spec::VmName::new("web", "app01").unwrap();
        let spec = crate::spec::VmSpec::for_request(
            &config,
            crate::ids::VmRequestId::from_uuid(uuid::Uuid::nil()),
            crate::ids::VmId::from_uuid(uuid::Uuid::nil()),
            &name,
            "web",
            config.sizes.resources(VmSize::S),
        );
        assert_eq!(spec.task_timeout, std::time::Duration::from_secs(90));
        assert_eq!(spec.ip_wait_timeout, std::time::Duration::from_secs(30));
    }

    fn error_for(edit: impl Fn(&str) -> String) -> String {
        toml::from_str::<TenantConfig>(&edit(GOOD))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_bad_field() {
        let e = error_for(|s| s.replace("https://vc.example.com/sdk", "vc.example.com"));
        assert!(e.contains("vcenter.url"), "{e}");
        let e = error_for(|s| s.replace("password = \"hunter2\"", "password = \"\""));
        assert!(e.contains("vcenter.password"), "{e}");
        let e = error_for(|s| s.replace("cpu = 3", "cpu = 0"));
        assert!(e.contains("sizes.M.cpu"), "{e}");
        let e = error_for(|s| s.replace("slug = \"acme\"", "slug = \"ac/me\""));
        assert!(e.contains("slug"), "{e}");
        let e = error_for(|s| s.replace("AA:BB", "ZZ:BB"));
        assert!(e.contains("vcenter.thumbprint"), "{e}");
        let e = error_for(|s| s.replace("datastore = \"LocalDS_0\"\n", ""));
        assert!(e.contains("datastore"), "{e}");
        let e = error_for(|s| s.replace("ip_wait_secs = 30", "ip_wait_secs = 99999"));
        assert!(e.contains("timeouts.ip_wait_secs"), "{e}");
        let e = error_for(|s| s.replace("network = ", "netwrok = "));
        assert!(e.contains("netwrok"), "{e}");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("pw");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "pw");
    }
}
