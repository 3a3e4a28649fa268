//! End-to-end provisioning throughput through `ProvisioningService` on a
//! zero-delay simulator and the memory store, on a current-thread and a
//! multi-thread runtime; with the simulator's bare `create_vm` as the
//! baseline measured in the same run, so the library's own cost per VM is
//! the difference.
//!
//! `cargo bench --bench provision`
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::Simulator;
use dvmm::{
    NewVmRequest, ProjectId, ProvisionOutcome, ProvisioningService, TenantConfig, TenantId,
    Tenants, UserId, VmId, VmRequestId, VmSize, VmSpec, VspherePort,
};
use uuid::Uuid;

const BATCH: usize = 1000;

fn tenant() -> TenantConfig {
    Simulator::default()
        .tenant_config(TenantId::from_uuid(Uuid::new_v4()), "acme")
        .unwrap()
}

type Service = ProvisioningService<Arc<MemoryEventStore>, Simulator, Arc<MemoryTimeline>>;

/// A zero-delay simulator whose IP pool does not run dry during a bench.
fn simulator() -> Simulator {
    let mut config = dvmm::vsphere::sim::SimulatorConfig::default();
    config.ip_pool.size = u32::MAX / 2;
    Simulator::new(config)
}

fn service(tenant: &TenantConfig) -> Service {
    ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        simulator(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(tenant.clone())
            .expect("a valid tenant configuration"),
    )
}

async fn full_flow(service: &Service, tenant: &TenantConfig, n: usize) {
    let request_id = service
        .submit(NewVmRequest {
            tenant_id: tenant.tenant_id,
            project_id: ProjectId::from_uuid(Uuid::nil()),
            project_prefix: "web".into(),
            requested_name: format!("vm{n}"),
            size: VmSize::M,
            requested_by: UserId::from_uuid(Uuid::nil()),
            justification: String::new(),
        })
        .await
        .unwrap();
    service
        .approve(tenant.tenant_id, request_id, UserId::from_uuid(Uuid::nil()))
        .await
        .unwrap();
    let outcome = service
        .provision(tenant.tenant_id, request_id)
        .await
        .unwrap();
    assert!(matches!(outcome, ProvisionOutcome::Ready { .. }));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("provision");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);

    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Baseline: the simulator's create_vm alone, same names and sizes.
    group.bench_function("baseline_sim_create_vm", |b| {
        let tenant = tenant();
        let sim = simulator();
        let mut round = 0u64;
        b.to_async(&current).iter(|| {
            round += 1;
            let sim = sim.clone();
            let tenant = tenant.clone();
            async move {
                for n in 0..BATCH {
                    let name = dvmm::VmName::new("web", &format!("r{round}vm{n}")).unwrap();
                    let spec = VmSpec::for_request(
                        &tenant,
                        VmRequestId::from_uuid(Uuid::new_v4()),
                        VmId::from_uuid(Uuid::new_v4()),
                        &name,
                        "web",
                        tenant.sizes.resources(VmSize::M),
                    );
                    sim.create_vm(&spec).await.unwrap();
                }
            }
        });
    });

    group.bench_function("full_flow_current_thread", |b| {
        b.to_async(&current).iter_batched(
            || {
                let tenant = tenant();
                (service(&tenant), tenant)
            },
            |(service, tenant)| async move {
                for n in 0..BATCH {
                    full_flow(&service, &tenant, n).await;
                }
            },
            criterion::BatchSize::PerIteration,
        );
    });

    group.bench_function("full_flow_multi_thread_64_tasks", |b| {
        b.to_async(&multi).iter_batched(
            || {
                let tenant = tenant();
                (Arc::new(service(&tenant)), tenant)
            },
            |(service, tenant)| async move {
                let tasks: Vec<_> = (0..64)
                    .map(|t| {
                        let service = service.clone();
                        let tenant = tenant.clone();
                        tokio::spawn(async move {
                            for n in (t..BATCH).step_by(64) {
                                full_flow(&service, &tenant, n).await;
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
