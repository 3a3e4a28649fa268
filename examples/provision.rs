//! Provision one VM end to end and print its timeline and events.
//!
//! ```text
//! cargo run --example provision                       # simulator + memory store
//! cargo run --example provision -- --name db01 --size L
//! cargo run --example provision -- --no-ip --ip-timeout-secs 3
//! RUST_LOG=dvmm=debug cargo run --example provision  # with tracing output
//!
//! # a real vCenter
//! DVMM_VCENTER_PASSWORD=... cargo run --example provision -- --vcenter-url https://vc.example.com/sdk \
//!     --username svc-dvmm --thumbprint SHA256 --template ubuntu-22.04
//! # govmomi's vcsim, which records no customization events (see the README)
//! cargo run --example provision -- --vcenter-url https://127.0.0.1:8989/sdk \
//!     --username user --password pass --insecure --template DC0_H0_VM0 \
//!     --customization-timeout-secs 0
//!
//! # events and timeline in PostgreSQL (an owner/admin URL: the example
//! # migrates, creates the application role and connects as it)
//! cargo run --features postgres --example provision -- --database-url postgres://...
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod common;

use clap::Parser;
use common::{VcenterArgs, tenant_id_for};
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{Delays, IpMode, Simulator, SimulatorConfig};
use dvmm::vsphere::soap::{SoapOptions, SoapVsphere};
use dvmm::{
    EventStore, NewVmRequest, ProjectId, ProvisionOutcome, ProvisioningService, TenantConfig,
    Tenants, TimelineSink, UserId, VmSize, VspherePort,
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
    /// PostgreSQL URL of a role that may migrate (feature `postgres`); the
    /// request, its events and timeline are stored there.
    #[arg(long)]
    database_url: Option<String>,
    /// Where to provision: a vCenter, or the in-process simulator.
    #[command(flatten)]
    vcenter: VcenterArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
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
    match args.vcenter.vcenter_url.clone() {
        Some(url) => run_on_vcenter(&args, size, url).await,
        None => run_on_simulator(&args, size).await,
    }
}

async fn run_on_vcenter(args: &Args, size: VmSize, url: String) -> Result<ExitCode, String> {
    let tenant = args.vcenter.tenant(
        url.clone(),
        &args.tenant,
        args.ip_timeout_secs.unwrap_or(120),
    )?;
    println!("vSphere: {url} as {}", args.vcenter.username);
    let vsphere = SoapVsphere::new(SoapOptions::default());
    let code = with_store(args, &tenant, vsphere.clone(), size).await;
    vsphere.shutdown().await;
    code
}

async fn run_on_simulator(args: &Args, size: VmSize) -> Result<ExitCode, String> {
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
    tenant.timeouts.ip_wait_secs = args.ip_timeout_secs.unwrap_or(5);
    println!("vSphere: in-process simulator");
    let code = with_store(args, &tenant, simulator.clone(), size).await?;
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

/// Picks the store: PostgreSQL with `--database-url`, else memory.
async fn with_store<V: VspherePort>(
    args: &Args,
    tenant: &TenantConfig,
    vsphere: V,
    size: VmSize,
) -> Result<ExitCode, String> {
    let tenants = Tenants::new()
        .with(tenant.clone())
        .map_err(|e| e.to_string())?;
    let Some(url) = &args.database_url else {
        println!("store: in memory");
        let service = ProvisioningService::new(
            Arc::new(MemoryEventStore::new()),
            vsphere,
            Arc::new(MemoryTimeline::new()),
            tenants,
        );
        return provision_one(&service, tenant, args, size).await;
    };
    #[cfg(feature = "postgres")]
    {
        // A per-run password is fine for an example on a throwaway
        // database; a host keeps its application login's password.
        let password = dvmm::Secret::new(format!("example-{}", uuid::Uuid::new_v4()));
        let parts = dvmm::store::postgres::setup(url, "dvmm_example", &password)
            .await
            .map_err(|e| e.to_string())?;
        let service = ProvisioningService::new(parts.store, vsphere, parts.timeline, tenants);
        let earlier = service
            .list_requests(tenant.tenant_id)
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "store: PostgreSQL; {} earlier request(s) of tenant {}:",
            earlier.len(),
            tenant.slug
        );
        for request in &earlier {
            println!(
                "  {}  {:<14} {}",
                request.id,
                request.status.to_string(),
                request.vm_name
            );
        }
        provision_one(&service, tenant, args, size).await
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = (url, vsphere, tenants);
        Err("--database-url needs the postgres feature: cargo run --features postgres --example provision -- --database-url URL".into())
    }
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
    let requester = UserId::new_v4();
    let approver = UserId::new_v4();
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
        ProvisionOutcome::Deferred { error, .. } if error.is_unavailable() => {
            eprintln!(
                "vCenter could not be reached ({error}); the request waits for it: \
                 run again later to resume (it fails only after the tenant's \
                 timeouts.unavailable_deadline_secs)"
            );
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
