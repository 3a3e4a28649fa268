//! The `VspherePort` contract (`dvmm_core::testing::vsphere_conformance`),
//! run against both shipped clients: the simulator always, and the SOAP
//! client against vcsim (skipped, saying why, without it unless
//! `DVMM_REQUIRE_SERVICES=1`).

mod common;

use std::time::Duration;

use common::{CALL_DEADLINE, Vcsim, fast_options, spec, within};
use dvmm_core::ids::{VmId, VmRequestId};
use dvmm_core::spec::{VmName, VmResources, VmSpec};
use dvmm_core::testing::vsphere_conformance;
use dvmm_vsphere::SoapVsphere;
use dvmm_vsphere::sim::{Delays, Simulator, SimulatorConfig};

#[tokio::test(start_paused = true)]
async fn the_simulator_passes_the_vsphere_contract() {
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays::none(),
        ..SimulatorConfig::default()
    });
    let config = sim
        .tenant_config(dvmm_core::ids::TenantId::new_v4(), "acme")
        .expect("the default inventory has a placement");
    let spec = VmSpec::for_request(
        &config,
        VmRequestId::new_v4(),
        VmId::new_v4(),
        &VmName::new("web", "contract").expect("valid name"),
        "web",
        VmResources {
            cpu: 2,
            memory_mib: 2048,
            disk_gib: 20,
        },
    );
    within(
        Duration::from_secs(600),
        "the contract on the simulator",
        vsphere_conformance(&sim, spec),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soap_client_passes_the_vsphere_contract_on_vcsim() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let mut spec = spec(
        sim.endpoint("user", "pass"),
        "acme/contract",
        "web-contract",
        "VM Network",
    );
    spec.ip_wait_timeout = Duration::from_millis(300);
    // vcsim posts no customization events (the customization wait has its
    // own vcsim tests, with a guest player): the contract does not wait.
    spec.customization_timeout = Duration::ZERO;
    let vsphere = SoapVsphere::new(fast_options());
    within(
        CALL_DEADLINE * 4,
        "the contract on vcsim",
        vsphere_conformance(&vsphere, spec),
    )
    .await;
}
