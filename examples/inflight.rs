//! Memory check: N provisionings in flight at once on a simulator whose
//! clone takes 1 s, through the full service and the memory store.
//!
//! ```text
//! cargo build --release --example inflight
//! /usr/bin/time -v target/release/examples/inflight 10000   # "Maximum resident set size"
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{Delays, Simulator, SimulatorConfig};
use dvmm::{
    NewVmRequest, ProjectId, ProvisionOutcome, ProvisioningService, TenantId, Tenants, UserId,
    VmSize,
};
use uuid::Uuid;

#[tokio::main]
async fn main() {
    let n: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 10_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("usage: inflight [COUNT]: {e}");
            std::process::exit(2);
        }
    };
    let mut config = SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(1),
            ..Delays::default()
        },
        ..SimulatorConfig::default()
    };
    config.ip_pool.size = (n as u32).saturating_add(10);
    // Room on the datastore for every disk.
    if let Some(dc) = config.inventory.datacenter_mut("DC0") {
        for ds in &mut dc.datastores {
            ds.free_gib = u64::MAX / 4;
        }
    }
    let simulator = Simulator::new(config);
    let tenant = simulator
        .tenant_config(TenantId::new_v4(), "acme")
        .expect("the default inventory has a placement");
    let service = Arc::new(ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        simulator,
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    ));
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = service
            .submit(NewVmRequest {
                tenant_id: tenant.tenant_id,
                project_id: ProjectId::from_uuid(Uuid::nil()),
                project_prefix: "web".into(),
                requested_name: format!("vm{i}"),
                size: VmSize::S,
                requested_by: UserId::from_uuid(Uuid::nil()),
                justification: String::new(),
            })
            .await
            .expect("submit");
        service
            .approve(tenant.tenant_id, id, UserId::from_uuid(Uuid::nil()))
            .await
            .expect("approve");
        ids.push(id);
    }
    let started = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let service = service.clone();
            let tenant_id = tenant.tenant_id;
            tokio::spawn(async move { service.provision(tenant_id, id).await })
        })
        .collect();
    let mut ready = 0;
    for task in tasks {
        if let Ok(Ok(ProvisionOutcome::Ready { .. })) = task.await {
            ready += 1;
        }
    }
    println!(
        "in flight: {n}, ready: {ready}, elapsed: {} ms",
        started.elapsed().as_millis()
    );
    if ready != n {
        std::process::exit(1);
    }
}
