//! What the examples share: the vCenter flags and the tenant they describe.

use clap::Args;
use dvmm::SizeTable;
use dvmm::config::{Secret, Timeouts, VcenterEndpoint};
use dvmm::{TenantConfig, TenantId};
use uuid::Uuid;

/// The flags that point an example at a real vCenter (or vcsim).
#[derive(Args, Debug)]
pub struct VcenterArgs {
    /// vCenter (or vcsim) SDK URL; without it the in-process simulator is used.
    #[arg(long)]
    pub vcenter_url: Option<String>,
    /// vCenter user.
    #[arg(long, default_value = "administrator@vsphere.local")]
    pub username: String,
    /// vCenter password (or env DVMM_VCENTER_PASSWORD).
    #[arg(long, env = "DVMM_VCENTER_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Skip TLS certificate verification.
    #[arg(long)]
    pub insecure: bool,
    /// Accept exactly the certificate with this SHA-256 fingerprint.
    #[arg(long)]
    pub thumbprint: Option<String>,
    /// Datacenter.
    #[arg(long, default_value = "DC0")]
    pub datacenter: String,
    /// Cluster.
    #[arg(long, default_value = "DC0_C0")]
    pub cluster: String,
    /// Datastore.
    #[arg(long, default_value = "LocalDS_0")]
    pub datastore: String,
    /// Network (standard or distributed port group).
    #[arg(long, default_value = "VM Network")]
    pub network: String,
    /// Template to clone (required with --vcenter-url).
    #[arg(long)]
    pub template: Option<String>,
    /// How long guest customization may take after power-on until vCenter
    /// records its outcome (default 600 s). 0: do not wait for the outcome,
    /// for a vCenter that records no customization events, such as vcsim
    /// ("Ready" then means powered on with the first usable IP).
    #[arg(long)]
    pub customization_timeout_secs: Option<u64>,
}

impl VcenterArgs {
    /// The validated configuration of tenant `slug` on `url` with these flags.
    pub fn tenant(
        &self,
        url: String,
        slug: &str,
        ip_wait_secs: u64,
    ) -> Result<TenantConfig, String> {
        let password = self
            .password
            .clone()
            .ok_or("--password (or DVMM_VCENTER_PASSWORD) is required with --vcenter-url")?;
        let template = self
            .template
            .clone()
            .ok_or("--template is required with --vcenter-url")?;
        let tenant = TenantConfig {
            tenant_id: tenant_id_for(slug),
            slug: slug.to_owned(),
            vcenter: VcenterEndpoint {
                url,
                username: self.username.clone(),
                password: Secret::new(password),
                insecure: self.insecure,
                thumbprint: self.thumbprint.clone(),
                allow_plain_http: false,
            },
            datacenter: self.datacenter.clone(),
            cluster: self.cluster.clone(),
            resource_pool: None,
            datastore: self.datastore.clone(),
            template,
            network: self.network.clone(),
            folder_root: None,
            sizes: SizeTable::default(),
            timeouts: Timeouts {
                ip_wait_secs,
                customization_secs: self
                    .customization_timeout_secs
                    .unwrap_or(Timeouts::default().customization_secs),
                ..Timeouts::default()
            },
            on_failure: Default::default(),
        };
        tenant.validate().map_err(|e| e.to_string())?;
        Ok(tenant)
    }
}

/// A stable tenant id per slug, so reruns against a durable store and
/// processes of one run find the same tenant.
pub fn tenant_id_for(slug: &str) -> TenantId {
    TenantId::from_uuid(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("dvmm-tenant:{slug}").as_bytes(),
    ))
}

/// Logs to stderr, filtered by `RUST_LOG` (nothing when it is unset).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
}
