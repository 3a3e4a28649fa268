//! A caller that dies after `CustomizeVM_Task` and before `PowerOnVM_Task`
//! leaves its VM off with the customization pending. vCenter (and vcsim)
//! refuse a second customization of such a VM with `CustomizationPending`.
//! The resuming caller adopts the VM, and the pending customization is the
//! one it asked for (the same recorded spec, on a VM carrying the same id),
//! so the VM is powered on instead of the request being failed. Against vcsim.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CALL_DEADLINE, Vcsim, fast_options, find, observer, read, spec, within};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_vsphere::session::Connector;
use dvmm_vsphere::soap::Response;
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::http::HttpTransport;
use dvmm_vsphere::transport::{BoxFuture, Call, Transport};
use dvmm_vsphere::types::PowerState;
use dvmm_vsphere::{SoapOptions, SoapVsphere};

/// vcsim over HTTP, except that the caller "dies" at `PowerOnVM_Task`: it
/// is never sent, and the call ends with an error no layer retries.
#[derive(Debug)]
struct DiesBeforePowerOn(HttpTransport);

impl Transport for DiesBeforePowerOn {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        if call.method == "PowerOnVM_Task" {
            return Box::pin(async {
                Err(VsphereError::Protocol {
                    message: "the caller died before powering on".into(),
                })
            });
        }
        self.0.round_trip(call)
    }
}

struct DyingConnector;

impl Connector for DyingConnector {
    fn connect(
        &self,
        url: &str,
        tls: &TlsPolicy,
        options: &SoapOptions,
    ) -> Result<Arc<dyn Transport>, VsphereError> {
        Ok(Arc::new(DiesBeforePowerOn(HttpTransport::new(
            url,
            tls,
            options.max_answer_bytes,
        )?)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_the_customization_was_sent_powers_the_vm_on() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let endpoint = sim.endpoint("user", "pass");
    let mut spec = spec(endpoint.clone(), "acme/web", "web-pending", "VM Network");
    spec.ip_wait_timeout = Duration::from_millis(300);
    // About the pending customization task, not its outcome: vcsim posts
    // no customization events, so the spec does not wait for them.
    spec.customization_timeout = Duration::ZERO;

    let dying = SoapVsphere::with_connector(fast_options(), DyingConnector);
    match within(CALL_DEADLINE, "the first create_vm", dying.create_vm(&spec)).await {
        Err(VsphereError::Protocol { .. }) => {}
        other => panic!("the first caller should die before powering on: {other:?}"),
    }
    let (_o, own) = observer(&endpoint);
    let vm = find(&own, "DC0/vm/acme/web/web-pending")
        .await
        .expect("the clone exists");
    let before = read(&own, &vm, &["runtime.powerState"]).await;
    assert_eq!(before.runtime.power_state, Some(PowerState::PoweredOff));

    let resumer = SoapVsphere::new(fast_options());
    let result = within(
        CALL_DEADLINE,
        "the resumed create_vm",
        resumer.create_vm(&spec),
    )
    .await
    .expect("the resume adopts the VM whose customization is pending");
    assert_eq!(result.vmware_vm_id.as_str(), vm.value);
    let after = read(&own, &vm, &["runtime.powerState"]).await;
    assert_eq!(after.runtime.power_state, Some(PowerState::PoweredOn));
    let folder = find(&own, "DC0/vm/acme/web").await.expect("the folder");
    let children = within(
        CALL_DEADLINE,
        "the folder's children",
        dvmm_vsphere::methods::retrieve_properties(&own, "Folder", &["childEntity"], &[folder]),
    )
    .await
    .expect("read the folder");
    assert_eq!(
        children[0].prop("childEntity").unwrap().children.len(),
        1,
        "one VM, adopted"
    );
}
