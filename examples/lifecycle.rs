//! One request through the whole lifecycle: a provisioning that fails after
//! its clone exists, the cleanup of that clone, a retry to Ready, a status
//! sync and a decommission. Prints the timeline, and exits non-zero if any
//! of its VMs is left behind.
//!
//! ```text
//! cargo run --example lifecycle                        # in-process simulator
//!
//! # a real vCenter (or govmomi's vcsim; see the README)
//! cargo run --example lifecycle -- --vcenter-url https://127.0.0.1:8989/sdk \
//!     --username user --password pass --insecure --template DC0_H0_VM0
//! ```
//!
//! The first attempt is made to fail the way a template that cannot be
//! customized fails: the clone exists and boots, then the guest's
//! customization reports `CustomizationFailed` (on the simulator through a
//! `Customize` fault rule; on a vCenter by a wrapper around the SOAP client
//! that reports that failure once the first VM is built).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod common;

use clap::Parser;
use common::{VcenterArgs, tenant_id_for};
use dvmm::core::config::VcenterEndpoint;
use dvmm::core::ports::{PowerOffMode, PowerOffOutcome, ProgressReporter};
use dvmm::core::spec::VmGuestInfo;
use dvmm::store::{MemoryEventStore, MemoryTimeline};
use dvmm::vsphere::sim::{Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig};
use dvmm::vsphere::{SoapOptions, SoapVsphere};
use dvmm::{
    NewVmRequest, ProjectId, ProvisionOutcome, ProvisioningService, TenantConfig, Tenants, UserId,
    VmId, VmProvisioningResult, VmSize, VmSpec, VmwareVmId, VsphereError, VspherePort,
};
use uuid::Uuid;

/// Walk one request through failure, cleanup, retry, status sync and
/// decommission.
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
    #[arg(long, default_value = "life01")]
    name: String,
    /// How long to wait for the guest IP (default: 5 s on a vCenter, whose
    /// test guests often report none; 5 s on the simulator).
    #[arg(long, default_value_t = 5)]
    ip_timeout_secs: u64,
    /// Where to run: a vCenter, or the in-process simulator.
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

fn customization_failed() -> VsphereError {
    VsphereError::TaskFailed {
        fault: "CustomizationFailed".into(),
        message: "the guest OS could not be customized from this template".into(),
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    dvmm::VmName::new(&args.project, &args.name).map_err(|e| e.to_string())?;
    match args.vcenter.vcenter_url.clone() {
        Some(url) => {
            let tenant = args
                .vcenter
                .tenant(url.clone(), &args.tenant, args.ip_timeout_secs)?;
            println!("vSphere: {url} as {}", args.vcenter.username);
            let soap = SoapVsphere::new(SoapOptions::default());
            let port = FailFirstBuild {
                inner: soap.clone(),
                armed: AtomicBool::new(true),
            };
            let result = walk(&args, &tenant, port).await;
            let left = match soap
                .list_vm_names(
                    &tenant.vcenter,
                    &tenant.datacenter,
                    &folder_of(&tenant, &args),
                )
                .await
            {
                Ok(names) => names,
                Err(e) => {
                    soap.shutdown().await;
                    return Err(format!("could not list the folder's VMs: {e}"));
                }
            };
            soap.shutdown().await;
            finish(result, &left)
        }
        None => {
            let sim = Simulator::new(SimulatorConfig {
                delays: Delays {
                    clone: Duration::from_millis(200),
                    power_on: Duration::from_millis(100),
                    ip_report: Duration::from_millis(300),
                    ..Delays::default()
                },
                ..SimulatorConfig::default()
            });
            let mut tenant = sim
                .tenant_config(tenant_id_for(&args.tenant), &args.tenant)
                .map_err(|e| e.to_string())?;
            tenant.timeouts.ip_wait_secs = args.ip_timeout_secs;
            println!("vSphere: in-process simulator");
            // The first guest reports a failed customization, as one whose
            // template lacks what customization needs would.
            sim.add_fault(FaultRule::times(
                Operation::Customize,
                1,
                Fault::Error(customization_failed()),
            ));
            let result = walk(&args, &tenant, sim.clone()).await;
            let left: Vec<String> = sim.vms().into_iter().map(|vm| vm.name).collect();
            finish(result, &left)
        }
    }
}

fn folder_of(tenant: &TenantConfig, args: &Args) -> String {
    format!("{}/{}", tenant.slug, args.project)
}

/// Reports what is left in the run's folder, then the walk's result.
fn finish(walked: Result<ExitCode, String>, left: &[String]) -> Result<ExitCode, String> {
    if left.is_empty() {
        println!("vCenter: no VM of this run is left");
    } else {
        println!("vCenter: VMs left behind: {left:?}");
    }
    let code = walked?;
    if left.is_empty() {
        Ok(code)
    } else {
        Err(format!("VMs left behind: {left:?}"))
    }
}

/// Runs the lifecycle and prints what each step did and the timeline.
async fn walk<V: VspherePort>(
    args: &Args,
    tenant: &TenantConfig,
    vsphere: V,
) -> Result<ExitCode, String> {
    let tenants = Tenants::new()
        .with(tenant.clone())
        .map_err(|e| e.to_string())?;
    let service = ProvisioningService::new(
        Arc::new(MemoryEventStore::new()),
        vsphere,
        Arc::new(MemoryTimeline::new()),
        tenants,
    );
    let t = tenant.tenant_id;
    let requester = UserId::from_uuid(Uuid::new_v4());
    let approver = UserId::from_uuid(Uuid::new_v4());
    let e = |e: dvmm::ServiceError| e.to_string();
    let request = service
        .submit(NewVmRequest {
            tenant_id: t,
            project_id: ProjectId::from_uuid(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                args.project.as_bytes(),
            )),
            project_prefix: args.project.clone(),
            requested_name: args.name.clone(),
            size: VmSize::S,
            requested_by: requester,
            justification: "created by the lifecycle example".into(),
        })
        .await
        .map_err(e)?;
    service.approve(t, request, approver).await.map_err(e)?;
    println!("request {request} approved");

    // 1. The first attempt fails after its clone exists; the direct call
    //    records the failure, then removes the clone.
    match service.provision(t, request).await.map_err(e)? {
        ProvisionOutcome::Failed { vm_id, error } => {
            println!("attempt 1 (VM {vm_id}): failed: {error}");
        }
        other => return Err(format!("the first attempt was meant to fail: {other:?}")),
    }
    let cleanup = service.cleanup_failed(t, request).await.map_err(e)?;
    println!("cleanup: {cleanup:?}");

    // 2. Retry: a new attempt with a new VM id, provisioned to Ready.
    let attempt = service.retry(t, request, requester).await.map_err(e)?;
    let vm_id = match service.provision(t, request).await.map_err(e)? {
        ProvisionOutcome::Ready { vm_id, result } => {
            println!(
                "attempt {attempt} (VM {vm_id}): ready as {} ({})",
                result.vmware_vm_id,
                result
                    .ip_address
                    .map_or("IP pending".to_owned(), |ip| ip.to_string())
            );
            vm_id
        }
        other => return Err(format!("the retry did not end ready: {other:?}")),
    };

    // 3. Live status from vCenter.
    let vm = service.sync_status(t, vm_id).await.map_err(e)?;
    println!("status sync: {}", vm.status);

    // 4. Decommission.
    let deleted = service
        .decommission(
            t,
            vm_id,
            requester,
            Some("lifecycle example finished".into()),
        )
        .await
        .map_err(e)?;
    println!("decommission: {deleted:?}");

    println!("timeline:");
    for entry in service.timeline(t, request).await.map_err(e)? {
        println!(
            "  {}  {:<20} {}",
            entry.occurred_at.format("%H:%M:%S%.3f"),
            entry.entry_type.as_str(),
            entry.details
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A vCenter's client whose first build is reported as a failed
/// customization once the VM exists, as a template that cannot be
/// customized would fail.
struct FailFirstBuild<V> {
    inner: V,
    armed: AtomicBool,
}

impl<V: VspherePort> VspherePort for FailFirstBuild<V> {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        self.create_vm_reporting(spec, &|_| {}).await
    }

    // Passes the inner client's progress on, so the timeline shows
    // "Customizing guest" as it would on a real vCenter.
    async fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        let result = self.inner.create_vm_reporting(spec, progress).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            return Err(customization_failed());
        }
        Ok(result)
    }

    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        self.inner.get_vm(endpoint, id).await
    }

    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        self.inner.find_vm(spec).await
    }

    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        self.inner.power_off_vm(endpoint, id, owner, mode).await
    }

    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        self.inner.destroy_vm(endpoint, id, owner).await
    }
}
