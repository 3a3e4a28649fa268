//! Per-tenant configuration: which vCenter, where VMs go, how big each size
//! is and how long to wait. Deserializable from TOML or JSON and validated on
//! load, with errors that name the bad field; loaded from text with
//! [`TenantConfig::from_json`] or [`TenantConfig::from_toml`], errors also
//! say the line and column.
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

use crate::config_spans::{FieldSpans, location_of, offset_of};
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

/// Longest customization wait a tenant may configure (one day); also the
/// cap of [`Timeouts::customization`].
pub const MAX_CUSTOMIZATION_SECS: u64 = 24 * 3600;

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
    /// How long guest customization may take after power-on, until vCenter
    /// records its outcome (default 600 s, as Terraform's customize
    /// timeout); after that the provisioning fails.
    ///
    /// 0 means: do not wait for the outcome. For a vCenter that records no
    /// customization events (govmomi's vcsim, for one), where every wait
    /// would end "customization never started". "Ready" then means powered
    /// on with VMware Tools running and the first usable IP (or none within
    /// the IP wait), which may be the template identity's address from
    /// before customization, and a failed customization goes unnoticed.
    #[serde(default = "Timeouts::default_customization_secs")]
    pub customization_secs: u64,
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
    fn default_customization_secs() -> u64 {
        600
    }

    /// The customization wait as a duration, at most
    /// [`MAX_CUSTOMIZATION_SECS`]; zero: do not wait for the outcome.
    pub fn customization(&self) -> Duration {
        Duration::from_secs(self.customization_secs.min(MAX_CUSTOMIZATION_SECS))
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
            customization_secs: Self::default_customization_secs(),
        }
    }
}

/// A configuration value is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted path of the bad field, e.g. `vcenter.url`; empty when no
    /// field can be told (a JSON syntax error, say).
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// Where in the text the error is, when the configuration was loaded
    /// from text by [`TenantConfig::from_json`] or
    /// [`TenantConfig::from_toml`]: the bad field's value, or where the
    /// parser stopped.
    pub location: Option<TextLocation>,
}

/// A 1-based line and column (counted in characters) in a configuration
/// text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextLocation {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
}

impl fmt::Display for TextLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

impl ConfigError {
    /// An error about `field` (a dotted path such as `vcenter.url`), with no
    /// location.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            location: None,
        }
    }

    /// This error, located at its field's value in `text`.
    fn located(mut self, text: &str, spans: &FieldSpans) -> Self {
        if self.location.is_none()
            && let Some(start) = spans.start_of(&self.field)
        {
            self.location = Some(location_of(text, start));
        }
        self
    }

    /// A parser's error: `message` (without the parser's own position) at
    /// byte `offset`, attributed to the field whose value holds it, or to
    /// the field a "missing field" or "unknown field" message names.
    fn from_parser(text: &str, spans: &FieldSpans, offset: Option<usize>, message: &str) -> Self {
        let at = offset.and_then(|offset| spans.field_at(offset));
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|lead| message.strip_prefix(lead))
            .and_then(|rest| rest.split('`').next());
        let field = match (named, at) {
            (Some(name), Some(parent)) => format!("{parent}.{name}"),
            (Some(name), None) => name.to_owned(),
            (None, at) => at.unwrap_or_default().to_owned(),
        };
        // Checks inside a value (a size's resources) name the exact field
        // first: `sizes.M.cpu: must be ...`.
        let (field, reason) = match message.split_once(": ") {
            Some((inner, reason))
                if !field.is_empty() && inner.starts_with(&format!("{field}.")) =>
            {
                (inner.to_owned(), reason.to_owned())
            }
            _ => (field, message.to_owned()),
        };
        let location = spans
            .start_of(&field)
            .filter(|_| named.is_none())
            .or(offset)
            .map(|offset| location_of(text, offset));
        Self {
            field,
            reason,
            location,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid tenant configuration")?;
        match (self.field.is_empty(), &self.location) {
            (true, Some(at)) => write!(f, " at {at}")?,
            (false, Some(at)) => write!(f, ": {} (at {at})", self.field)?,
            (true, None) => {}
            (false, None) => write!(f, ": {}", self.field)?,
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// What happens to the VM a provisioning made when it fails for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Power it off and destroy it (it blocks its name and uses storage).
    #[default]
    Destroy,
    /// Leave it for someone to look at (debugging a template); a retry of
    /// the request then meets it as a VM of another attempt
    /// (`DuplicateName`) until it is removed by hand.
    Keep,
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
    /// What happens to a failed provisioning's VM (`on_failure`, default
    /// `destroy`).
    pub on_failure: OnFailure,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantConfig {
    // Parsed after the rest, so that a malformed id is an error that names
    // this field (serde's own UUID error names none).
    tenant_id: String,
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
    #[serde(default)]
    on_failure: OnFailure,
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
        let tenant_id = raw.tenant_id.trim().parse::<TenantId>().map_err(|_| {
            ConfigError::new(
                "tenant_id",
                format!(
                    "{:?} is not a UUID (such as 6f1c1d2e-0000-4000-8000-000000000001)",
                    raw.tenant_id
                ),
            )
        })?;
        let config = TenantConfig {
            tenant_id,
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
            on_failure: raw.on_failure,
        };
        config.validate()?;
        Ok(config)
    }
}

impl TenantConfig {
    /// Loads and validates a configuration from JSON text.
    ///
    /// Unlike `serde_json::from_str`, which only knows where the parser
    /// stopped, the error names the field and says where its value is.
    ///
    /// ```
    /// use dvmm_core::config::TenantConfig;
    ///
    /// let err = TenantConfig::from_json("{\n  \"tenant_id\": 7\n}").unwrap_err();
    /// assert_eq!(err.field, "tenant_id");
    /// let at = err.location.unwrap();
    /// assert_eq!((at.line, at.column), (2, 16));
    /// ```
    ///
    /// # Errors
    /// A [`ConfigError`] with the bad field (empty when none can be told)
    /// and its [`TextLocation`].
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw = serde_json::from_str::<RawTenantConfig>(text).map_err(|error| {
            let spans = FieldSpans::of_json(text);
            let offset = (error.line() > 0).then(|| offset_of(text, error.line(), error.column()));
            // serde_json appends its own position, which the location
            // replaces.
            let message = error.to_string();
            let message = match message.rsplit_once(" at line ") {
                Some((message, _)) if error.line() > 0 => message.to_owned(),
                _ => message,
            };
            ConfigError::from_parser(text, &spans, offset, &message)
        })?;
        Self::try_from(raw).map_err(|error| error.located(text, &FieldSpans::of_json(text)))
    }

    /// Loads and validates a configuration from TOML text (feature `toml`).
    ///
    /// ```
    /// use dvmm_core::config::TenantConfig;
    ///
    /// let err = TenantConfig::from_toml("tenant_id = 42\n").unwrap_err();
    /// assert_eq!(err.field, "tenant_id");
    /// assert_eq!(err.location.unwrap().line, 1);
    /// ```
    ///
    /// # Errors
    /// A [`ConfigError`] with the bad field (empty when none can be told)
    /// and its [`TextLocation`].
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw = toml::from_str::<RawTenantConfig>(text).map_err(|error| {
            let spans = FieldSpans::of_toml(text);
            let offset = error.span().map(|span| span.start);
            ConfigError::from_parser(text, &spans, offset, error.message())
        })?;
        Self::try_from(raw).map_err(|error| error.located(text, &FieldSpans::of_toml(text)))
    }

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
        if self.timeouts.customization_secs > MAX_CUSTOMIZATION_SECS {
            return Err(ConfigError::new(
                "timeouts.customization_secs",
                "must be at most 86400 seconds (0: do not wait for the customization outcome)",
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
    fn the_customization_wait_defaults_to_ten_minutes_zero_skips_it_and_is_bounded() {
        let config: TenantConfig = toml::from_str(GOOD).unwrap();
        assert_eq!(config.timeouts.customization_secs, 600);
        let with = |secs: &str| {
            GOOD.replace(
                "ip_wait_secs = 30",
                &format!("ip_wait_secs = 30\ncustomization_secs = {secs}"),
            )
        };
        let skip: TenantConfig = toml::from_str(&with("0")).unwrap();
        assert_eq!(skip.timeouts.customization(), Duration::ZERO);
        let name = crate::spec::VmName::new("web", "app01").unwrap();
        let spec = crate::spec::VmSpec::for_request(
            &skip,
            crate::ids::VmRequestId::from_uuid(uuid::Uuid::nil()),
            crate::ids::VmId::from_uuid(uuid::Uuid::nil()),
            &name,
            "web",
            skip.sizes.resources(VmSize::S),
        );
        assert_eq!(spec.customization_timeout, Duration::ZERO);
        let e = toml::from_str::<TenantConfig>(&with("86401"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.customization_secs"), "{e}");
        // Built in code, unvalidated: still capped.
        let huge = Timeouts {
            customization_secs: u64::MAX,
            ..Timeouts::default()
        };
        assert_eq!(
            huge.customization(),
            Duration::from_secs(MAX_CUSTOMIZATION_SECS)
        );
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

    const GOOD_JSON: &str = r#"{
  "tenant_id": "6f1c1d2e-0000-4000-8000-000000000001",
  "slug": "acme",
  "vcenter": {
    "url": "https://vc.example.com/sdk",
    "username": "svc-dvmm",
    "password": "hunter2"
  },
  "datacenter": "DC0", "cluster": "DC0_C0", "datastore": "LocalDS_0",
  "template": "ubuntu-22.04", "network": "VM Network",
  "sizes": { "M": { "cpu": 3, "memory_mib": 6144, "disk_gib": 60 } },
  "timeouts": { "ip_wait_secs": 30 }
}"#;

    fn json_error(from: &str, to: &str) -> ConfigError {
        assert!(GOOD_JSON.contains(from), "{from}");
        TenantConfig::from_json(&GOOD_JSON.replace(from, to)).unwrap_err()
    }

    fn at(error: &ConfigError) -> (usize, usize) {
        let location = error
            .location
            .unwrap_or_else(|| panic!("no location: {error}"));
        (location.line, location.column)
    }

    #[test]
    fn from_json_loads_what_serde_loads() {
        let config = TenantConfig::from_json(GOOD_JSON).unwrap();
        assert_eq!(
            config,
            serde_json::from_str::<TenantConfig>(GOOD_JSON).unwrap()
        );
        assert_eq!(config.sizes.resources(VmSize::M).cpu, 3);
    }

    #[test]
    fn json_errors_name_the_field_and_where_its_value_is() {
        // A malformed tenant id: serde alone names no field.
        let e = json_error("6f1c1d2e-0000-4000-8000-000000000001", "acme");
        assert_eq!(e.field, "tenant_id");
        assert_eq!(at(&e), (2, 16));
        assert!(
            e.to_string().contains("tenant_id (at line 2, column 16)"),
            "{e}"
        );
        // A rule checked after parsing: serde_json would say line 0, column 0.
        let e = json_error("https://vc.example.com/sdk", "vc.example.com");
        assert_eq!(e.field, "vcenter.url");
        assert_eq!(at(&e), (5, 12));
        // A value of the wrong type, nested.
        let e = json_error("\"ip_wait_secs\": 30", "\"ip_wait_secs\": \"soon\"");
        assert_eq!(e.field, "timeouts.ip_wait_secs");
        assert_eq!(at(&e).0, 12);
        // A size's resources name the exact field.
        let e = json_error("\"cpu\": 3", "\"cpu\": 0");
        assert_eq!(e.field, "sizes.M.cpu");
        assert_eq!(at(&e), (11, 28));
        // Unknown and missing fields.
        let e = json_error("\"network\"", "\"netwrok\"");
        assert_eq!(e.field, "netwrok");
        assert_eq!(at(&e).0, 10);
        let e = json_error("\"username\": \"svc-dvmm\",", "");
        assert_eq!(e.field, "vcenter.username");
        assert!(e.location.is_some(), "{e}");
    }

    #[test]
    fn a_json_syntax_error_has_a_location_and_no_field() {
        let e = json_error("\"slug\": \"acme\",", "\"slug\": \"acme\"");
        assert_eq!(e.field, "");
        assert_eq!(at(&e).0, 4);
        assert!(
            e.to_string()
                .starts_with("invalid tenant configuration at line 4"),
            "{e}"
        );
    }

    #[test]
    fn toml_errors_name_the_field_and_where_its_value_is() {
        let toml_error = |from: &str, to: &str| {
            assert!(GOOD.contains(from), "{from}");
            TenantConfig::from_toml(&GOOD.replace(from, to)).unwrap_err()
        };
        assert_eq!(
            TenantConfig::from_toml(GOOD).unwrap(),
            toml::from_str::<TenantConfig>(GOOD).unwrap()
        );
        let e = toml_error("https://vc.example.com/sdk", "vc.example.com");
        assert_eq!(e.field, "vcenter.url");
        assert_eq!(at(&e), (11, 7));
        let e = toml_error("\"6f1c1d2e-0000-4000-8000-000000000001\"", "42");
        assert_eq!(e.field, "tenant_id");
        assert_eq!(at(&e), (2, 13));
        let e = toml_error("cpu = 3", "cpu = 0");
        assert_eq!(e.field, "sizes.M.cpu");
        assert_eq!(at(&e), (17, 7));
        let e = toml_error("ip_wait_secs = 30", "ip_wait_secs = 99999");
        assert_eq!(e.field, "timeouts.ip_wait_secs");
        assert_eq!(at(&e), (22, 16));
        let e = toml_error("network = ", "netwrok = ");
        assert_eq!(e.field, "netwrok");
        assert_eq!(at(&e).0, 8);
        // A syntax error inside a value is put on that value's field.
        let e = toml_error("slug = \"acme\"", "slug = \"acme");
        assert_eq!(e.field, "slug");
        assert_eq!(at(&e).0, 3);
        // Inline tables are located too.
        let inline = GOOD
            .replace("[sizes.M]\ncpu = 3\nmemory_mib = 6144\ndisk_gib = 60\n", "")
            .replace(
                "network = \"VM Network\"\n",
                "network = \"VM Network\"\nsizes = { M = { cpu = 0, memory_mib = 6144, disk_gib = 60 } }\n",
            );
        let e = TenantConfig::from_toml(&inline).unwrap_err();
        assert_eq!(e.field, "sizes.M.cpu");
        assert_eq!(at(&e), (9, 23));
    }

    #[test]
    fn a_bad_tenant_id_names_the_field_through_plain_serde_too() {
        let text = GOOD_JSON.replace("6f1c1d2e-0000-4000-8000-000000000001", "acme");
        let e = serde_json::from_str::<TenantConfig>(&text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenant_id"), "{e}");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("pw");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "pw");
    }
}
