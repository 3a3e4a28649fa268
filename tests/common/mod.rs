//! Shared test setup: a tenant configured for the simulator's default inventory.
#![allow(dead_code)]

pub mod stepping;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use dvmm::core::config::{Secret, Timeouts, VcenterEndpoint};
use dvmm::core::spec::SizeTable;
use dvmm::{NewVmRequest, ProjectId, TenantConfig, TenantId, UserId, VmSize};
use uuid::Uuid;

pub fn tenant_config(slug: &str, ip_wait_secs: u64) -> TenantConfig {
    TenantConfig {
        tenant_id: TenantId::from_uuid(Uuid::new_v4()),
        slug: slug.into(),
        vcenter: VcenterEndpoint {
            url: "https://vc.test.invalid/sdk".into(),
            username: "svc".into(),
            password: Secret::new("pw"),
            insecure: false,
            thumbprint: None,
            allow_plain_http: false,
        },
        datacenter: "DC0".into(),
        cluster: "DC0_C0".into(),
        resource_pool: None,
        datastore: "LocalDS_0".into(),
        template: "ubuntu-22.04-template".into(),
        network: "VM Network".into(),
        folder_root: None,
        sizes: SizeTable::default(),
        timeouts: Timeouts {
            ip_wait_secs,
            ..Timeouts::default()
        },
        on_failure: Default::default(),
    }
}

pub fn new_request(tenant: &TenantConfig, name: &str) -> NewVmRequest {
    NewVmRequest {
        tenant_id: tenant.tenant_id,
        project_id: ProjectId::from_uuid(Uuid::new_v4()),
        project_prefix: "web".into(),
        requested_name: name.into(),
        size: VmSize::M,
        requested_by: UserId::from_uuid(Uuid::new_v4()),
        justification: "test".into(),
    }
}

pub fn user() -> UserId {
    UserId::from_uuid(Uuid::new_v4())
}

/// Wall time that follows tokio's clock (paused in most tests) from
/// 2026-03-02 12:00 UTC, so what the service stamps and what a queue leases
/// move with the test's sleeps.
pub struct PausedClock {
    wall: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl PausedClock {
    /// Starts at 2026-03-02 12:00 UTC now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            wall: "2026-03-02T12:00:00Z".parse().expect("valid time"),
            start: tokio::time::Instant::now(),
        })
    }
}

impl dvmm::Clock for PausedClock {
    fn now(&self) -> DateTime<Utc> {
        self.wall + chrono::Duration::from_std(self.start.elapsed()).expect("test durations fit")
    }
}
