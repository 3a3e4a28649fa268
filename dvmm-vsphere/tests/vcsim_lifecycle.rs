//! Power-off, destroy and power-state reads of the SOAP adapter against
//! govmomi's vcsim, one simulator per test. The VMs are made with the
//! test's own session (a plain clone carrying a dvmm id), so these tests do
//! not depend on how `create_vm` provisions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CALL_DEADLINE, Vcsim, fast_options, find, observer, read, within};
use dvmm_core::config::VcenterEndpoint;
use dvmm_core::ids::{VmId, VmwareVmId};
use dvmm_core::ports::{PowerOffMode, PowerOffOutcome, VsphereError, VspherePort};
use dvmm_core::spec::PowerState as CorePowerState;
use dvmm_vsphere::methods::{self, CloneSpec, ConfigSpec};
use dvmm_vsphere::session::Session;
use dvmm_vsphere::types::{MoRef, PowerState};
use dvmm_vsphere::{SoapVsphere, VM_ID_KEY, wait};

/// Clones vcsim's `DC0_H0_VM0` as `name` into `DC0/vm`, carrying `vm_id`
/// (or no dvmm id), then powers it on when asked; with `tools`, the guest
/// reports VMware Tools running.
async fn make_vm(
    session: &Arc<Session>,
    name: &str,
    vm_id: Option<VmId>,
    power_on: bool,
    tools: bool,
) -> MoRef {
    let template = find(session, "DC0/vm/DC0_H0_VM0").await.expect("template");
    let folder = find(session, "DC0/vm").await.expect("VM folder");
    let pool = find(session, "DC0/host/DC0_C0/Resources")
        .await
        .expect("pool");
    let datastore = find(session, "DC0/datastore/LocalDS_0")
        .await
        .expect("datastore");
    let mut config = ConfigSpec::default();
    if let Some(id) = vm_id {
        config.extra_config.push((VM_ID_KEY.into(), id.to_string()));
    }
    let spec = CloneSpec {
        datastore,
        pool,
        config,
    };
    let task = within(
        CALL_DEADLINE,
        "CloneVM_Task",
        methods::clone_vm(session, &template, &folder, name, &spec),
    )
    .await
    .expect("clone");
    let result = within(
        CALL_DEADLINE,
        "the clone task",
        wait::wait_for_task(session, &task, "CloneVM_Task", CALL_DEADLINE),
    )
    .await
    .expect("clone task");
    let vm = result
        .as_ref()
        .and_then(MoRef::from_node)
        .expect("the clone's VM");
    if power_on {
        let task = within(
            CALL_DEADLINE,
            "PowerOnVM_Task",
            methods::power_on_vm(session, &vm),
        )
        .await
        .expect("power on");
        within(
            CALL_DEADLINE,
            "the power-on task",
            wait::wait_for_task(session, &task, "PowerOnVM_Task", CALL_DEADLINE),
        )
        .await
        .expect("power-on task");
    }
    if tools {
        let change = ConfigSpec {
            extra_config: vec![(
                "SET.guest.toolsRunningStatus".into(),
                "guestToolsRunning".into(),
            )],
            ..ConfigSpec::default()
        };
        let task = within(
            CALL_DEADLINE,
            "ReconfigVM_Task",
            methods::reconfig_vm(session, &vm, &change),
        )
        .await
        .expect("reconfigure");
        within(
            CALL_DEADLINE,
            "the reconfigure task",
            wait::wait_for_task(session, &task, "ReconfigVM_Task", CALL_DEADLINE),
        )
        .await
        .expect("reconfigure task");
    }
    vm
}

async fn power_state(session: &Session, vm: &MoRef) -> Option<PowerState> {
    read(session, vm, &["runtime.powerState"])
        .await
        .runtime
        .power_state
}

fn id_of(vm: &MoRef) -> VmwareVmId {
    VmwareVmId::new(vm.value.clone())
}

async fn power_off(
    vsphere: &SoapVsphere,
    endpoint: &VcenterEndpoint,
    vm: &MoRef,
    owner: VmId,
    mode: PowerOffMode,
) -> Result<PowerOffOutcome, VsphereError> {
    within(
        CALL_DEADLINE,
        "power_off_vm",
        vsphere.power_off_vm(endpoint, &id_of(vm), owner, mode),
    )
    .await
}

async fn destroy(
    vsphere: &SoapVsphere,
    endpoint: &VcenterEndpoint,
    vm: &MoRef,
    owner: VmId,
) -> Result<(), VsphereError> {
    within(
        CALL_DEADLINE,
        "destroy_vm",
        vsphere.destroy_vm(endpoint, &id_of(vm), owner),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_power_off_then_destroy_and_a_gone_vm_is_vm_gone() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_observer, own) = observer(&endpoint);
    let owner = VmId::from_uuid(uuid::Uuid::new_v4());
    let vm = make_vm(&own, "life-hard", Some(owner), true, false).await;
    let vsphere = SoapVsphere::new(fast_options());

    let info = within(
        CALL_DEADLINE,
        "get_vm",
        vsphere.get_vm(&endpoint, &id_of(&vm)),
    )
    .await
    .expect("get_vm");
    assert_eq!(info.power_state, CorePowerState::PoweredOn);
    assert_eq!(info.dvmm_vm_id, Some(owner));

    assert_eq!(
        power_off(&vsphere, &endpoint, &vm, owner, PowerOffMode::Hard).await,
        Ok(PowerOffOutcome::Hard)
    );
    assert_eq!(power_state(&own, &vm).await, Some(PowerState::PoweredOff));
    let info = within(
        CALL_DEADLINE,
        "get_vm",
        vsphere.get_vm(&endpoint, &id_of(&vm)),
    )
    .await
    .expect("get_vm");
    assert_eq!(info.power_state, CorePowerState::PoweredOff);
    // Again: nothing to do, and nothing is sent that vCenter would refuse.
    assert_eq!(
        power_off(&vsphere, &endpoint, &vm, owner, PowerOffMode::Hard).await,
        Ok(PowerOffOutcome::AlreadyOff)
    );

    destroy(&vsphere, &endpoint, &vm, owner)
        .await
        .expect("destroy");
    assert_eq!(find(&own, "DC0/vm/life-hard").await, None);

    let gone = VsphereError::VmGone {
        vmware_vm_id: vm.value.clone(),
    };
    assert_eq!(
        destroy(&vsphere, &endpoint, &vm, owner).await,
        Err(gone.clone())
    );
    assert_eq!(
        power_off(&vsphere, &endpoint, &vm, owner, PowerOffMode::Hard).await,
        Err(gone)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_vm_that_is_on_is_invalid_power_state_and_leaves_it() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_observer, own) = observer(&endpoint);
    let owner = VmId::from_uuid(uuid::Uuid::new_v4());
    let vm = make_vm(&own, "life-on", Some(owner), true, false).await;
    let vsphere = SoapVsphere::new(fast_options());

    let result = destroy(&vsphere, &endpoint, &vm, owner).await;
    assert!(
        matches!(result, Err(VsphereError::InvalidPowerState { .. })),
        "{result:?}"
    );
    assert_eq!(find(&own, "DC0/vm/life-on").await, Some(vm.clone()));
    assert_eq!(power_state(&own, &vm).await, Some(PowerState::PoweredOn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_shutdown_with_tools_and_hard_fallback_without() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_observer, own) = observer(&endpoint);
    let vsphere = SoapVsphere::new(fast_options());
    let mode = PowerOffMode::Guest {
        timeout: Duration::from_secs(20),
    };

    let owner = VmId::from_uuid(uuid::Uuid::new_v4());
    let with_tools = make_vm(&own, "life-tools", Some(owner), true, true).await;
    assert_eq!(
        power_off(&vsphere, &endpoint, &with_tools, owner, mode).await,
        Ok(PowerOffOutcome::GuestShutdown)
    );
    assert_eq!(
        power_state(&own, &with_tools).await,
        Some(PowerState::PoweredOff)
    );

    // No VMware Tools: the guest cannot be asked, so the power is cut.
    let other = VmId::from_uuid(uuid::Uuid::new_v4());
    let without = make_vm(&own, "life-notools", Some(other), true, false).await;
    assert_eq!(
        power_off(&vsphere, &endpoint, &without, other, mode).await,
        Ok(PowerOffOutcome::Hard)
    );
    assert_eq!(
        power_state(&own, &without).await,
        Some(PowerState::PoweredOff)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_our_id_is_never_touched() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let (_observer, own) = observer(&endpoint);
    let vsphere = SoapVsphere::new(fast_options());
    let owner = VmId::from_uuid(uuid::Uuid::new_v4());

    // vcsim's own VM carries no dvmm id at all.
    let foreign = find(&own, "DC0/vm/DC0_H0_VM0").await.expect("DC0_H0_VM0");
    // And one of ours for another dvmm VM.
    let someone_elses = make_vm(
        &own,
        "life-other",
        Some(VmId::from_uuid(uuid::Uuid::new_v4())),
        true,
        false,
    )
    .await;

    for vm in [&foreign, &someone_elses] {
        let not_ours = VsphereError::NotOurs {
            vmware_vm_id: vm.value.clone(),
        };
        for mode in [
            PowerOffMode::Hard,
            PowerOffMode::Guest {
                timeout: Duration::from_secs(5),
            },
        ] {
            assert_eq!(
                power_off(&vsphere, &endpoint, vm, owner, mode).await,
                Err(not_ours.clone())
            );
        }
        assert_eq!(destroy(&vsphere, &endpoint, vm, owner).await, Err(not_ours));
        assert_eq!(power_state(&own, vm).await, Some(PowerState::PoweredOn));
    }
    assert_eq!(find(&own, "DC0/vm/DC0_H0_VM0").await, Some(foreign));
    assert_eq!(find(&own, "DC0/vm/life-other").await, Some(someone_elses));
}
