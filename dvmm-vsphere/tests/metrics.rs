//! The SOAP client's metrics (`dvmm_core::telemetry`): latency and faults
//! per method, and the breaker's state per endpoint, recorded through the
//! `metrics` facade. A scripted vCenter that refuses every connection, on
//! paused time, with a local debugging recorder.

use std::sync::Arc;
use std::time::Duration;

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_core::telemetry::{VSPHERE_BREAKER_OPEN, VSPHERE_CALL_DURATION, VSPHERE_FAULTS};
use dvmm_vsphere::tls::TlsPolicy;
use dvmm_vsphere::transport::Transport;
use dvmm_vsphere::transport::scripted::{ScriptedTransport, Step};
use dvmm_vsphere::{SoapOptions, SoapVsphere};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_refusing_vcenter_shows_as_faults_by_method_and_an_open_breaker() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Everything below runs on this one thread, so a local recorder sees it.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let script = ScriptedTransport::new();
    script.fallback(|_| {
        Step::Error(VsphereError::Transport {
            message: "connection refused".into(),
        })
    });
    let transport = script.clone();
    let options = SoapOptions {
        breaker_threshold: 2,
        ..SoapOptions::default()
    };
    let vsphere = SoapVsphere::with_connector(
        options,
        move |_: &str,
              _: &TlsPolicy,
              _: &SoapOptions|
              -> Result<Arc<dyn Transport>, VsphereError> {
            Ok(Arc::new(transport.clone()))
        },
    );
    let endpoint = VcenterEndpoint {
        url: "https://vc.example.test/sdk".into(),
        username: "svc".into(),
        password: Secret::new("pw"),
        insecure: true,
        thumbprint: None,
        allow_plain_http: false,
    };
    let err = tokio::time::timeout(
        Duration::from_secs(600),
        vsphere.get_vm(
            &endpoint,
            &dvmm_core::ids::VmwareVmId::new("vm-1".to_owned()),
        ),
    )
    .await
    .expect("the call ends")
    .expect_err("nothing answers");
    assert!(err.is_unavailable(), "{err:?}");

    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, labels: &[(&str, &str)]| {
        snapshot.iter().find(|(key, _, _, _)| {
            key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
    };
    match find(
        VSPHERE_FAULTS,
        &[("method", "RetrieveServiceContent"), ("fault", "Transport")],
    ) {
        Some((_, _, _, DebugValue::Counter(n))) => {
            assert_eq!(*n as usize, script.count("RetrieveServiceContent"));
        }
        other => panic!("no fault counter for the refused calls: {other:?}\n{snapshot:?}"),
    }
    assert!(
        matches!(
            find(VSPHERE_CALL_DURATION, &[("method", "RetrieveServiceContent")]),
            Some((_, _, _, DebugValue::Histogram(samples))) if !samples.is_empty()
        ),
        "call latencies recorded: {snapshot:?}"
    );
    match find(VSPHERE_BREAKER_OPEN, &[("endpoint", "vc.example.test:443")]) {
        Some((_, _, _, DebugValue::Gauge(open))) => assert_eq!(open.into_inner(), 1.0),
        other => panic!("no breaker gauge for the endpoint: {other:?}\n{snapshot:?}"),
    }
}
