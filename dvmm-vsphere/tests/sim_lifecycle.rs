//! Power-off, destroy and power-state reads of the in-process simulator
//! through the `VspherePort` it implements, on paused tokio time.

use std::time::Duration;

use dvmm_core::ports::{PowerOffMode, PowerOffOutcome};
use dvmm_core::spec::{PowerState, VmName};
use dvmm_core::{VmId, VmResources, VmSpec, VmwareVmId, VsphereError, VspherePort};
use dvmm_vsphere::sim::{Fault, FaultRule, IpMode, Operation, Simulator};
use tokio::time::Instant;

fn uuid<T: std::str::FromStr>(n: u64) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("00000000-0000-4000-8000-{n:012x}")
        .parse()
        .expect("valid uuid")
}

fn spec(sim: &Simulator, name: &str, n: u64) -> VmSpec {
    let config = sim
        .tenant_config(uuid(1), "acme")
        .expect("inventory has a placement");
    VmSpec::for_request(
        &config,
        uuid(1000 + n),
        uuid(n),
        &VmName::new("web", name).expect("valid name"),
        "web",
        VmResources {
            cpu: 2,
            memory_mib: 4096,
            disk_gib: 40,
        },
    )
}

async fn created(sim: &Simulator, spec: &VmSpec) -> VmwareVmId {
    sim.create_vm(spec).await.expect("create_vm").vmware_vm_id
}

fn gone(id: &VmwareVmId) -> VsphereError {
    VsphereError::VmGone {
        vmware_vm_id: id.as_str().to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn get_vm_reports_each_power_state() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let id = created(&sim, &spec).await;
    for state in [
        PowerState::PoweredOff,
        PowerState::Suspended,
        PowerState::PoweredOn,
    ] {
        assert!(sim.set_power_state(&id, state));
        let info = sim.get_vm(&spec.endpoint, &id).await.expect("get_vm");
        assert_eq!(info.power_state, state);
        assert_eq!(info.dvmm_vm_id, Some(spec.vm_id));
    }
}

#[tokio::test(start_paused = true)]
async fn hard_power_off_destroy_and_gone() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let id = created(&sim, &spec).await;
    let ep = &spec.endpoint;

    assert_eq!(
        sim.power_off_vm(ep, &id, spec.vm_id, PowerOffMode::Hard)
            .await,
        Ok(PowerOffOutcome::Hard)
    );
    assert_eq!(
        sim.vm(&id).expect("still there").power_state,
        PowerState::PoweredOff
    );
    assert_eq!(
        sim.power_off_vm(ep, &id, spec.vm_id, PowerOffMode::Hard)
            .await,
        Ok(PowerOffOutcome::AlreadyOff)
    );
    sim.destroy_vm(ep, &id, spec.vm_id).await.expect("destroy");
    assert!(sim.vms().is_empty());
    assert_eq!(sim.find_vm(&spec).await, Ok(None));
    assert_eq!(sim.destroy_vm(ep, &id, spec.vm_id).await, Err(gone(&id)));
    assert_eq!(
        sim.power_off_vm(ep, &id, spec.vm_id, PowerOffMode::Hard)
            .await,
        Err(gone(&id))
    );
    // The name is free again: the same request can clone anew.
    let again = created(&sim, &spec).await;
    assert_ne!(again, id);
}

#[tokio::test(start_paused = true)]
async fn destroy_refuses_a_vm_that_is_on() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let id = created(&sim, &spec).await;
    let result = sim.destroy_vm(&spec.endpoint, &id, spec.vm_id).await;
    assert!(
        matches!(result, Err(VsphereError::InvalidPowerState { .. })),
        "{result:?}"
    );
    assert_eq!(sim.vms().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn guest_shutdown_in_time_falls_back_to_hard_when_late_or_without_tools() {
    let sim = Simulator::default();
    let grace = Duration::from_secs(30);
    let mode = PowerOffMode::Guest { timeout: grace };

    // Tools running, the guest takes 10 s: shut down by the guest, in 10 s.
    sim.set_guest_shutdown(Some(Duration::from_secs(10)));
    let a = spec(&sim, "a", 1);
    let id = created(&sim, &a).await;
    let start = Instant::now();
    assert_eq!(
        sim.power_off_vm(&a.endpoint, &id, a.vm_id, mode).await,
        Ok(PowerOffOutcome::GuestShutdown)
    );
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(sim.vm(&id).expect("vm").power_state, PowerState::PoweredOff);

    // The guest ignores the request: cut after the grace period.
    sim.set_guest_shutdown(None);
    let b = spec(&sim, "b", 2);
    let id = created(&sim, &b).await;
    let start = Instant::now();
    assert_eq!(
        sim.power_off_vm(&b.endpoint, &id, b.vm_id, mode).await,
        Ok(PowerOffOutcome::Hard)
    );
    assert_eq!(start.elapsed(), grace);
    assert_eq!(sim.vm(&id).expect("vm").power_state, PowerState::PoweredOff);

    // No Tools: nothing to ask, cut at once.
    sim.set_guest_shutdown(Some(Duration::from_secs(1)));
    sim.set_ip_mode(IpMode::Never);
    let c = spec(&sim, "c", 3);
    let mut short = c.clone();
    short.ip_wait_timeout = Duration::from_secs(1);
    let id = created(&sim, &short).await;
    let start = Instant::now();
    assert_eq!(
        sim.power_off_vm(&c.endpoint, &id, c.vm_id, mode).await,
        Ok(PowerOffOutcome::Hard)
    );
    assert_eq!(start.elapsed(), Duration::ZERO);

    // Suspended: no guest to ask either.
    let d = spec(&sim, "d", 4);
    let mut short = d.clone();
    short.ip_wait_timeout = Duration::from_secs(1);
    let id = created(&sim, &short).await;
    assert!(sim.set_power_state(&id, PowerState::Suspended));
    assert_eq!(
        sim.power_off_vm(&d.endpoint, &id, d.vm_id, mode).await,
        Ok(PowerOffOutcome::Hard)
    );
}

#[tokio::test(start_paused = true)]
async fn a_vm_without_our_id_is_never_touched() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let ours = created(&sim, &spec).await;
    let foreign = sim.insert_foreign_vm("acme/web", "web-foreign");
    let stranger: VmId = uuid(99);

    for (id, owner) in [(&foreign, spec.vm_id), (&ours, stranger)] {
        let not_ours = VsphereError::NotOurs {
            vmware_vm_id: id.as_str().to_owned(),
        };
        for mode in [
            PowerOffMode::Hard,
            PowerOffMode::Guest {
                timeout: Duration::from_secs(5),
            },
        ] {
            assert_eq!(
                sim.power_off_vm(&spec.endpoint, id, owner, mode).await,
                Err(not_ours.clone())
            );
        }
        assert_eq!(
            sim.destroy_vm(&spec.endpoint, id, owner).await,
            Err(not_ours)
        );
        assert_eq!(
            sim.vm(id).expect("still there").power_state,
            PowerState::PoweredOn
        );
    }
    assert_eq!(sim.vms().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn fault_rules_hit_power_off_and_destroy() {
    let sim = Simulator::default();
    let spec = spec(&sim, "app01", 1);
    let id = created(&sim, &spec).await;
    let ep = &spec.endpoint;
    let owner = spec.vm_id;

    // A refused call changes nothing.
    sim.add_fault(FaultRule::times(
        Operation::PowerOffVm,
        1,
        Fault::Error(VsphereError::TaskFailed {
            fault: "SystemError".into(),
            message: "injected".into(),
        }),
    ));
    assert!(matches!(
        sim.power_off_vm(ep, &id, owner, PowerOffMode::Hard).await,
        Err(VsphereError::TaskFailed { .. })
    ));
    assert_eq!(sim.vm(&id).expect("vm").power_state, PowerState::PoweredOn);

    // A lost answer: the VM is off although the call failed.
    sim.add_fault(FaultRule::times(
        Operation::PowerOffVm,
        1,
        Fault::CreatedButCallFailed,
    ));
    assert!(matches!(
        sim.power_off_vm(ep, &id, owner, PowerOffMode::Hard).await,
        Err(VsphereError::Transport { .. })
    ));
    assert_eq!(sim.vm(&id).expect("vm").power_state, PowerState::PoweredOff);

    sim.add_fault(FaultRule::times(Operation::DestroyVm, 1, Fault::Transient));
    assert!(matches!(
        sim.destroy_vm(ep, &id, owner).await,
        Err(VsphereError::Transport { .. })
    ));
    assert_eq!(sim.vms().len(), 1);

    sim.add_fault(FaultRule::times(
        Operation::DestroyVm,
        1,
        Fault::CreatedButCallFailed,
    ));
    assert!(matches!(
        sim.destroy_vm(ep, &id, owner).await,
        Err(VsphereError::Transport { .. })
    ));
    assert!(sim.vms().is_empty());
    assert_eq!(sim.destroy_vm(ep, &id, owner).await, Err(gone(&id)));

    assert_eq!(sim.call_count(Operation::PowerOffVm), 2);
    assert_eq!(sim.call_count(Operation::DestroyVm), 3);

    // An endpoint outage refuses them like any call.
    let other = self::spec(&sim, "app02", 2);
    let id = created(&sim, &other).await;
    sim.set_endpoint_down(&other.endpoint.url);
    assert!(matches!(
        sim.power_off_vm(&other.endpoint, &id, other.vm_id, PowerOffMode::Hard)
            .await,
        Err(VsphereError::Transport { .. })
    ));
    assert_eq!(sim.vm(&id).expect("vm").power_state, PowerState::PoweredOn);
}
