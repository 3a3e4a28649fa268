//! Provision one VM end to end and print its timeline and events.
//!
//! ```text
//! cargo run --example provision                       # simulator + memory store
//! cargo run --example provision -- --name db01 --size L
//! cargo run --example provision -- --no-ip --ip-timeout-secs 3
//! RUST_LOG=dvmm=debug cargo run --example provision  # with tracing output
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dvmm::store::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{Delays, IpMode, Simulator, SimulatorConfig};
use dvmm::{
    EventStore, NewVmRequest, ProjectId, ProvisionOutcome, ProvisioningService, TenantConfig,
    TenantId, Tenants, TimelineSink, UserId, VmSize, VspherePort,
};
use uuid::Uuid;

/// Provision a VM from a self-service request, end to end.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Tenant short name (its folder in vCenter).
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// Project prefix (first part of the VM name, and its folder).
    #[arg(long, default_value = "web")]
    project: String,
    /// Requested VM name (the VM is named `{project}-{name}`).
    #[arg(long, default_value = "app01")]
    name: String,
    /// Size: S, M, L or XL.
    #[arg(long, default_value = "M")]
    size: String,
    /// How long to wait for the guest IP (default: 120 s on a vCenter,
    /// 5 s on the simulator).
    #[arg(long)]
    ip_timeout_secs: Option<u64>,
    /// Simulator only: the guest never reports an IP.
    #[arg(long)]
    no_ip: bool,
}

fn tenant_id_for(slug: &str) -> TenantId {
    // A stable id per slug, so reruns against a durable store find the tenant again.
    TenantId::from_uuid(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("dvmm-tenant:{slug}").as_bytes(),
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let size: VmSize = args.size.parse().map_err(|e| format!("{e}"))?;
    // Validate the name before anything else so bad input is reported plainly.
    dvmm::VmName::new(&args.project, &args.name).map_err(|e| e.to_string())?;
    let ip_timeout = args.ip_timeout_secs.unwrap_or(5);
    let simulator = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_millis(300),
            power_on: Duration::from_millis(100),
            ip_report: Duration::from_millis(700),
            ..Delays::default()
        },
        ip_mode: if args.no_ip {
            IpMode::Never
        } else {
            IpMode::Report
        },
        ..SimulatorConfig::default()
    });
    let mut tenant = simulator
        .tenant_config(tenant_id_for(&args.tenant), &args.tenant)
        .map_err(|e| e.to_string())?;
    tenant.timeouts.ip_wait_secs = ip_timeout;
    println!("vSphere: in-process simulator; store: in memory");
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        simulator.clone(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new().with(tenant.clone()),
    );
    let code = provision_one(&service, &tenant, &args, size).await?;
    if let Some(vm) = simulator
        .vms()
        .into_iter()
        .find(|vm| vm.name == format!("{}-{}", args.project, args.name))
    {
        println!(
            "simulator: {} in {}/{}: {} vCPU, {} MiB, {} GiB, network {:?}, {:?}",
            vm.vmware_vm_id,
            vm.datacenter,
            vm.folder_path,
            vm.resources.cpu,
            vm.resources.memory_mib,
            vm.resources.disk_gib,
            vm.network,
            vm.power_state
        );
    }
    Ok(code)
}

/// Files, approves and provisions one request, printing the timeline as it
/// grows, then the VM and the events.
async fn provision_one<S, V, T>(
    service: &ProvisioningService<S, V, T>,
    tenant: &TenantConfig,
    args: &Args,
    size: VmSize,
) -> Result<ExitCode, String>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
{
    let requester = UserId::from_uuid(Uuid::new_v4());
    let approver = UserId::from_uuid(Uuid::new_v4());
    let request_id = service
        .submit(NewVmRequest {
            tenant_id: tenant.tenant_id,
            project_id: ProjectId::from_uuid(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                args.project.as_bytes(),
            )),
            project_prefix: args.project.clone(),
            requested_name: args.name.clone(),
            size,
            requested_by: requester,
            justification: "created by the provision example".into(),
        })
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "request {request_id} for tenant {} ({})",
        tenant.slug, tenant.tenant_id
    );
    let mut printed = 0;
    let print_new = |printed: usize| {
        let timeline = service.timeline(tenant.tenant_id, request_id);
        async move {
            let entries = timeline.await.map_err(|e| e.to_string())?;
            for entry in entries.iter().skip(printed) {
                println!(
                    "  {}  {:<20} {}",
                    entry.occurred_at.format("%H:%M:%S%.3f"),
                    entry.entry_type.as_str(),
                    entry.details
                );
            }
            Ok::<_, String>(entries.len())
        }
    };
    println!("timeline:");
    printed = print_new(printed).await?;
    service
        .approve(tenant.tenant_id, request_id, approver)
        .await
        .map_err(|e| e.to_string())?;
    printed = print_new(printed).await?;

    let provisioning = service.provision(tenant.tenant_id, request_id);
    tokio::pin!(provisioning);
    let outcome = loop {
        tokio::select! {
            outcome = &mut provisioning => break outcome.map_err(|e| e.to_string())?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => printed = print_new(printed).await?,
        }
    };
    print_new(printed).await?;

    let code = match &outcome {
        ProvisionOutcome::Ready { vm_id, result } => {
            let vm = service
                .vm(tenant.tenant_id, *vm_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the VM stream is missing")?;
            println!("VM:");
            println!("  name        {}", vm.name);
            println!("  vmware id   {}", result.vmware_vm_id);
            println!(
                "  ip          {}",
                result
                    .ip_address
                    .map_or("(pending)".to_owned(), |ip| ip.to_string())
            );
            println!("  hostname    {}", result.hostname);
            println!("  cpu         {}", vm.resources.cpu);
            println!("  memory      {} MiB", vm.resources.memory_mib);
            println!("  disk        {} GiB", vm.resources.disk_gib);
            println!("  folder      {}", vm.folder_path);
            if let Some(warning) = &result.warning_message {
                println!("  warning     {warning}");
            }
            ExitCode::SUCCESS
        }
        ProvisionOutcome::Failed { error, .. } => {
            eprintln!("provisioning failed: {error}");
            ExitCode::from(1)
        }
        ProvisionOutcome::Deferred { error, .. } => {
            eprintln!("provisioning interrupted by a temporary failure: {error}");
            ExitCode::from(1)
        }
        ProvisionOutcome::Skipped { reason, .. } => {
            eprintln!("nothing provisioned: {reason}");
            ExitCode::from(1)
        }
    };
    println!("events:");
    let events = service
        .store()
        .read_all(tenant.tenant_id, 0, 10_000)
        .await
        .map_err(|e| e.to_string())?;
    for event in events.iter().filter(|e| {
        e.stream_id.id == request_id.to_string()
            || matches!(&outcome, ProvisionOutcome::Ready { vm_id, .. } | ProvisionOutcome::Failed { vm_id, .. } if e.stream_id.id == vm_id.to_string())
    }) {
        println!(
            "  #{:<4} {:<10} v{:<2} {}",
            event.position, event.stream_id.stream_type, event.version, event.event_type
        );
    }
    Ok(code)
}
