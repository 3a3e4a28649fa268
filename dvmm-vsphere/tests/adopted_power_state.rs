//! Adopting a VM that another caller finishes meanwhile: the VM is off when
//! this call reads it, so it customizes, but by then the other caller has
//! powered it on and vCenter refuses the customization with
//! InvalidPowerState. The VM being on is the goal: the call goes on to the
//! IP wait instead of failing. On a scripted vCenter (no vcsim), paused time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_core::spec::VmSpec;
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::Transport;
use dvmm_vsphere::transport::scripted::{ScriptedTransport, Step};
use dvmm_vsphere::{SoapOptions, SoapVsphere};

const PASSWORD: &str = "Sup3r-Secret-pw!";
const VM_PATH: &str = "DC0/vm/acme/web/web-01";

fn spec() -> VmSpec {
    let mut spec = common::spec(
        VcenterEndpoint {
            url: "https://vc.example.test/sdk".into(),
            username: "svc-dvmm".into(),
            password: Secret::new(PASSWORD),
            insecure: true,
            thumbprint: None,
            allow_plain_http: false,
        },
        "acme/web",
        "web-01",
        "VM Network",
    );
    // About power states: the scripted vCenter records no customization
    // events, so the spec does not wait for them.
    spec.customization_timeout = Duration::ZERO;
    spec
}

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

fn moref(method: &str, kind: &str, value: &str) -> Step {
    Step::ok(
        method,
        &format!(r#"<returnval type="{kind}">{value}</returnval>"#),
    )
}

/// A vCenter holding this request's VM (vm-63, off when first read, on
/// afterwards), answering from recorded fixtures.
fn vcenter_with_the_vm(script: &ScriptedTransport, spec: &VmSpec) {
    let vm_id = spec.vm_id.to_string();
    script.fallback(move |call| {
        let body = call.body.as_str();
        match call.method {
            "RetrieveServiceContent" => Step::Answer(fixture("RetrieveServiceContent")),
            "Login" => Step::Answer(fixture("Login")),
            "Logout" => Step::Answer(fixture("Logout")),
            "FindByInventoryPath" => {
                let path = between(body, "<inventoryPath>", "</inventoryPath>").unwrap_or("");
                let m = "FindByInventoryPath";
                match path {
                    VM_PATH => moref(m, "VirtualMachine", "vm-63"),
                    "DC0" => moref(m, "Datacenter", "datacenter-2"),
                    p if p.ends_with("DC0_C0_RP0_VM0") => moref(m, "VirtualMachine", "vm-63"),
                    p if p.contains("/host/") => moref(m, "ResourcePool", "resgroup-1"),
                    p if p.contains("/datastore/") => moref(m, "Datastore", "datastore-1"),
                    p if p.contains("/network/") => moref(m, "Network", "network-7"),
                    _ => moref(m, "Folder", "group-v3"),
                }
            }
            "RetrievePropertiesEx" if body.contains("<type>Task</type>") => Step::ok(
                "RetrievePropertiesEx",
                concat!(
                    r#"<returnval><objects><obj type="Task">task-1</obj>"#,
                    r#"<propSet><name>info.state</name><val xsi:type="TaskInfoState">success</val></propSet>"#,
                    r#"</objects></returnval>"#
                ),
            ),
            // The power state alone: asked after a refusal, when the other
            // caller has powered the VM on.
            "RetrievePropertiesEx"
                if body.contains("runtime.powerState") && !body.contains("config.hardware") =>
            {
                Step::ok(
                    "RetrievePropertiesEx",
                    concat!(
                        r#"<returnval><objects><obj type="VirtualMachine">vm-63</obj>"#,
                        r#"<propSet><name>runtime.powerState</name><val xsi:type="VirtualMachinePowerState">poweredOn</val></propSet>"#,
                        r#"</objects></returnval>"#
                    ),
                )
            }
            "RetrievePropertiesEx" if !body.contains("config.hardware") => Step::ok(
                "RetrievePropertiesEx",
                &format!(
                    concat!(
                        r#"<returnval><objects><obj type="VirtualMachine">vm-63</obj>"#,
                        r#"<propSet><name>config.extraConfig</name><val xsi:type="ArrayOfOptionValue">"#,
                        r#"<OptionValue xsi:type="OptionValue"><key>dvmm.vmId</key>"#,
                        r#"<value xsi:type="xsd:string">{}</value></OptionValue></val></propSet>"#,
                        r#"</objects></returnval>"#
                    ),
                    vm_id
                ),
            ),
            "RetrievePropertiesEx" => Step::Answer(
                fixture("RetrievePropertiesEx-vm")
                    .replace("<powerState>poweredOn", "<powerState>poweredOff"),
            ),
            "ReconfigVM_Task" | "PowerOnVM_Task" => moref(call.method, "Task", "task-2"),
            "CustomizeVM_Task" => Step::fault("InvalidPowerState"),
            "CreateFolder" => Step::Answer(fixture("CreateFolder")),
            "CreatePropertyCollector" => Step::Answer(fixture("CreatePropertyCollector")),
            "CreateFilter" => Step::Answer(fixture("CreateFilter")),
            "WaitForUpdatesEx" => Step::Answer(fixture("WaitForUpdatesEx-change")),
            "DestroyPropertyCollector" => Step::Answer(fixture("DestroyPropertyCollector")),
            other => Step::Error(VsphereError::Protocol {
                message: format!("the scripted vCenter does not know {other}"),
            }),
        }
    });
}

#[tokio::test(start_paused = true)]
async fn a_customization_refused_because_the_adopted_vm_is_already_on_goes_on_to_the_ip() {
    let script = ScriptedTransport::new();
    let spec = spec();
    vcenter_with_the_vm(&script, &spec);
    let transport = script.clone();
    let vsphere = SoapVsphere::with_connector(
        SoapOptions::default(),
        move |_: &str,
              _: &TlsPolicy,
              _: &SoapOptions|
              -> Result<Arc<dyn Transport>, VsphereError> {
            Ok(Arc::new(transport.clone()))
        },
    );
    let result = tokio::time::timeout(Duration::from_secs(600), vsphere.create_vm(&spec))
        .await
        .expect("create_vm on the scripted vCenter ended")
        .expect("the VM another caller powered on is adopted, not failed");
    assert_eq!(result.vmware_vm_id.as_str(), "vm-63");
    assert_eq!(result.ip_address, Some("10.0.0.42".parse().unwrap()));
    assert_eq!(script.count("CloneVM_Task"), 0, "adopted, not cloned");
    assert_eq!(script.count("CustomizeVM_Task"), 1);
    assert_eq!(
        script.count("PowerOnVM_Task"),
        0,
        "the VM is already on: not powered on again"
    );
}
