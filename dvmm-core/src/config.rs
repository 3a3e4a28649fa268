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
use crate::size::SizeTable;

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
        f.pad("***")
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
    /// Accept an `http://` URL, which sends the password in the clear
    /// (default false: only for a lab behind a TLS-terminating proxy).
    #[serde(default)]
    pub allow_plain_http: bool,
}

impl VcenterEndpoint {
    /// Which vCenter server this is, for telling endpoints apart (e.g. to
    /// park the work of one that is down): see [`endpoint_key`].
    pub fn key(&self) -> String {
        endpoint_key(&self.url)
    }
}

/// The server part of a vCenter URL, normalized: lower-case host, explicit
/// port (443 for `https`, 80 for `http`), no user info, path or trailing
/// slash. Two URLs of one server give the same key:
///
/// ```
/// use dvmm_core::config::endpoint_key;
/// assert_eq!(endpoint_key("https://VC.example.com/sdk"), "vc.example.com:443");
/// assert_eq!(endpoint_key("https://vc.example.com:443/sdk/"), "vc.example.com:443");
/// assert_eq!(endpoint_key("http://[::1]:8989/sdk"), "[::1]:8989");
/// ```
pub fn endpoint_key(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_ascii_lowercase();
    // A port follows the last ':' unless that ':' is inside an IPv6 literal.
    let has_port = match host_port.rfind(':') {
        Some(i) => !host_port[i..].contains(']'),
        None => false,
    };
    if has_port {
        host_port
    } else {
        let port = if scheme.eq_ignore_ascii_case("http") {
            80
        } else {
            443
        };
        format!("{host_port}:{port}")
    }
}

/// `url` with any user info replaced by `***`, so that an error can show the
/// URL without its credentials.
fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// Longest IP wait a tenant may configure (one hour); also the cap
/// [`Timeouts::ip_wait`] applies to a configuration that was never validated.
pub const MAX_IP_WAIT_SECS: u64 = 3600;
/// Longest task timeout a tenant may configure (one day); also the cap of
/// [`Timeouts::task`].
pub const MAX_TASK_SECS: u64 = 24 * 3600;
/// Longest unavailable deadline a tenant may configure (one week); also the
/// cap of [`Timeouts::unavailable_deadline`].
pub const MAX_UNAVAILABLE_DEADLINE_SECS: u64 = 7 * 24 * 3600;

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
    /// How long a request waits for its vCenter to come back when it cannot
    /// be reached (default 3600 s), counted from when the request started
    /// waiting; after that it fails, saying since when vCenter was
    /// unreachable.
    #[serde(default = "Timeouts::default_unavailable_deadline_secs")]
    pub unavailable_deadline_secs: u64,
}

impl Timeouts {
    fn default_ip_wait_secs() -> u64 {
        120
    }
    fn default_task_secs() -> u64 {
        1800
    }
    fn default_unavailable_deadline_secs() -> u64 {
        3600
    }

    // The accessors cap what they return: a configuration built in code
    // need not have been validated, and a deadline computed from an
    // uncapped value (`Instant + Duration`) would overflow and panic.

    /// The unavailable deadline as a duration, at most
    /// [`MAX_UNAVAILABLE_DEADLINE_SECS`].
    pub fn unavailable_deadline(&self) -> Duration {
        Duration::from_secs(
            self.unavailable_deadline_secs
                .min(MAX_UNAVAILABLE_DEADLINE_SECS),
        )
    }

    /// The IP wait as a duration, at most [`MAX_IP_WAIT_SECS`].
    pub fn ip_wait(&self) -> Duration {
        Duration::from_secs(self.ip_wait_secs.min(MAX_IP_WAIT_SECS))
    }

    /// The task timeout as a duration, at most [`MAX_TASK_SECS`].
    pub fn task(&self) -> Duration {
        Duration::from_secs(self.task_secs.min(MAX_TASK_SECS))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            ip_wait_secs: Self::default_ip_wait_secs(),
            task_secs: Self::default_task_secs(),
            unavailable_deadline_secs: Self::default_unavailable_deadline_secs(),
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

/// The URL must be `https://` (or `http://` when explicitly allowed), name a
/// host and carry no credentials. Errors never repeat user info.
fn validate_url(vcenter: &VcenterEndpoint) -> Result<(), ConfigError> {
    const FIELD: &str = "vcenter.url";
    let url = vcenter.url.trim();
    let shown = redacted_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(ConfigError::new(
            FIELD,
            format!("{shown:?} must be an https URL such as https://vc.example.com/sdk"),
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(ConfigError::new(
            FIELD,
            format!(
                "{shown:?} carries user info: put the user in vcenter.username and the password in vcenter.password, never in the URL"
            ),
        ));
    }
    if scheme.eq_ignore_ascii_case("http") {
        if !vcenter.allow_plain_http {
            return Err(ConfigError::new(
                FIELD,
                format!(
                    "{shown:?} is plain http, which would send the password unencrypted: use https, or set vcenter.allow_plain_http = true for a lab"
                ),
            ));
        }
    } else if !scheme.eq_ignore_ascii_case("https") {
        return Err(ConfigError::new(
            FIELD,
            format!("{shown:?} must be an https URL such as https://vc.example.com/sdk"),
        ));
    }
    let host = authority
        .rsplit_once(':')
        .map_or(
            authority,
            |(host, port)| {
                if port.contains(']') { authority } else { host }
            },
        );
    if host.trim_matches(['[', ']']).trim().is_empty() {
        return Err(ConfigError::new(FIELD, "has no host"));
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
        validate_url(&self.vcenter)?;
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
        if self.timeouts.ip_wait_secs > MAX_IP_WAIT_SECS {
            return Err(ConfigError::new(
                "timeouts.ip_wait_secs",
                "must be at most 3600 seconds",
            ));
        }
        if self.timeouts.task_secs == 0 || self.timeouts.task_secs > MAX_TASK_SECS {
            return Err(ConfigError::new(
                "timeouts.task_secs",
                "must be between 1 and 86400 seconds",
            ));
        }
        if self.timeouts.unavailable_deadline_secs == 0
            || self.timeouts.unavailable_deadline_secs > MAX_UNAVAILABLE_DEADLINE_SECS
        {
            return Err(ConfigError::new(
                "timeouts.unavailable_deadline_secs",
                "must be between 1 and 604800 seconds (one week)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::VmSize;

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
    fn the_unavailable_deadline_defaults_to_an_hour_and_is_bounded() {
        let config: TenantConfig = toml::from_str(GOOD).unwrap();
        assert_eq!(config.timeouts.unavailable_deadline_secs, 3600);
        assert_eq!(
            config.timeouts.unavailable_deadline(),
            std::time::Duration::from_secs(3600)
        );
        let with = |secs: &str| {
            toml::from_str::<TenantConfig>(&GOOD.replace(
                "ip_wait_secs = 30",
                &format!("ip_wait_secs = 30\nunavailable_deadline_secs = {secs}"),
            ))
        };
        assert_eq!(with("90").unwrap().timeouts.unavailable_deadline_secs, 90);
        for bad in ["0", "604801"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("timeouts.unavailable_deadline_secs"), "{e}");
        }
    }

    #[test]
    fn plain_http_needs_an_explicit_opt_in() {
        let plain = |s: &str| s.replace("https://vc.example.com/sdk", "http://vc.example.com/sdk");
        let e = error_for(plain);
        assert!(e.contains("vcenter.url"), "{e}");
        assert!(e.contains("allow_plain_http"), "{e}");
        let config: TenantConfig = toml::from_str(
            &plain(GOOD).replace("[vcenter]\n", "[vcenter]\nallow_plain_http = true\n"),
        )
        .unwrap();
        assert!(config.vcenter.allow_plain_http);
        assert_eq!(config.vcenter.key(), "vc.example.com:80");
        let e = error_for(|s| s.replace("https://vc.example.com/sdk", "ftp://vc.example.com/sdk"));
        assert!(e.contains("vcenter.url"), "{e}");
        let e = error_for(|s| s.replace("https://vc.example.com/sdk", "https:///sdk"));
        assert!(e.contains("no host"), "{e}");
    }

    #[test]
    fn urls_with_user_info_are_refused_without_echoing_the_password() {
        for url in [
            "https://svc-dvmm:Pa55w0rd@vc.example.com/sdk",
            "http://svc-dvmm:Pa55w0rd@vc.example.com/sdk",
            "svc-dvmm:Pa55w0rd@vc.example.com/sdk",
            "https://Pa55w0rd@vc.example.com/sdk",
        ] {
            let e = error_for(|s| s.replace("https://vc.example.com/sdk", url));
            assert!(e.contains("vcenter.url"), "{url}: {e}");
            assert!(!e.contains("Pa55w0rd"), "{url}: {e}");
        }
        let e = error_for(|s| s.replace("https://vc.example.com/sdk", "https://a:b@vc/sdk"));
        assert!(e.contains("user info"), "{e}");
        assert!(e.contains("***@vc"), "{e}");
    }

    #[test]
    fn endpoint_keys_name_the_server_only() {
        for (url, key) in [
            ("https://vc.example.com/sdk", "vc.example.com:443"),
            ("HTTPS://VC.Example.com:443/sdk/", "vc.example.com:443"),
            ("https://vc.example.com:8989", "vc.example.com:8989"),
            ("http://10.0.0.1/sdk", "10.0.0.1:80"),
            ("https://[fe80::1]/sdk", "[fe80::1]:443"),
            ("https://[fe80::1]:9443/sdk?x=1", "[fe80::1]:9443"),
            ("https://u:p@vc.example.com/sdk", "vc.example.com:443"),
        ] {
            assert_eq!(endpoint_key(url), key, "{url}");
        }
        assert_ne!(
            endpoint_key("https://vc-a.example.com/sdk"),
            endpoint_key("https://vc-b.example.com/sdk")
        );
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("pw");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "pw");
    }
}
