//! TLS policy against vcsim serving its own end-entity certificate.

mod common;

use common::{CALL_DEADLINE, Vcsim, fast_options, spec, within};
use dvmm_core::ports::{VsphereError, VspherePort};
use dvmm_vsphere::SoapVsphere;
use dvmm_vsphere::tls::{format_thumbprint, thumbprint_of};

struct Cert {
    _dir: std::path::PathBuf,
    cert: String,
    key: String,
    thumbprint: String,
}

/// An end-entity certificate (CA:FALSE, SAN 127.0.0.1) in a temp folder.
fn end_entity_cert() -> Cert {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(format!("dvmm-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Cert {
        thumbprint: format_thumbprint(&thumbprint_of(cert.der())),
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_is_on_by_default_and_pinning_works() {
    let cert = end_entity_cert();
    let Some(sim) = Vcsim::start(&["-tlscert", &cert.cert, "-tlskey", &cert.key]) else {
        return;
    };
    let mut endpoint = sim.endpoint("user", "pass");
    endpoint.insecure = false;
    let spec_with = |endpoint: dvmm_core::config::VcenterEndpoint| {
        spec(endpoint, "acme/web", "web-tls", "VM Network")
    };

    // Default: a self-signed certificate is rejected, with a clear error.
    let vsphere = SoapVsphere::new(fast_options());
    match within(
        CALL_DEADLINE,
        "find_vm",
        vsphere.find_vm(&spec_with(endpoint.clone())),
    )
    .await
    {
        Err(VsphereError::Tls { message }) => {
            assert!(message.contains("thumbprint"), "{message}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // The right thumbprint (colon form or bare lower-case hex) is accepted.
    for pin in [
        cert.thumbprint.clone(),
        cert.thumbprint.replace(':', "").to_lowercase(),
    ] {
        let mut pinned = endpoint.clone();
        pinned.thumbprint = Some(pin);
        let vsphere = SoapVsphere::new(fast_options());
        assert_eq!(
            within(
                CALL_DEADLINE,
                "find_vm",
                vsphere.find_vm(&spec_with(pinned))
            )
            .await
            .unwrap(),
            None
        );
    }

    // A wrong thumbprint is rejected, even with insecure set.
    let mut wrong = endpoint.clone();
    wrong.thumbprint = Some(format_thumbprint(&[0xAB; 32]));
    wrong.insecure = true;
    match within(
        CALL_DEADLINE,
        "find_vm",
        SoapVsphere::new(fast_options()).find_vm(&spec_with(wrong)),
    )
    .await
    {
        Err(VsphereError::Tls { message }) => {
            assert!(message.contains("does not match"), "{message}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // A malformed thumbprint is a TLS configuration error before any I/O.
    let mut malformed = endpoint.clone();
    malformed.thumbprint = Some("12:34".into());
    assert!(matches!(
        within(
            CALL_DEADLINE,
            "find_vm",
            SoapVsphere::new(fast_options()).find_vm(&spec_with(malformed))
        )
        .await,
        Err(VsphereError::Tls { .. })
    ));

    // insecure accepts it.
    let mut insecure = endpoint;
    insecure.insecure = true;
    assert_eq!(
        within(
            CALL_DEADLINE,
            "find_vm",
            SoapVsphere::new(fast_options()).find_vm(&spec_with(insecure))
        )
        .await
        .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_accepts_vcsims_default_weak_certificate() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let mut endpoint = sim.endpoint("user", "pass");
    let vsphere = SoapVsphere::new(fast_options());
    assert_eq!(
        within(
            CALL_DEADLINE,
            "find_vm",
            vsphere.find_vm(&spec(endpoint.clone(), "a/b", "b-c", "VM Network"))
        )
        .await
        .unwrap(),
        None
    );
    endpoint.insecure = false;
    assert!(matches!(
        within(
            CALL_DEADLINE,
            "find_vm",
            SoapVsphere::new(fast_options()).find_vm(&spec(endpoint, "a/b", "b-c", "VM Network"))
        )
        .await,
        Err(VsphereError::Tls { .. })
    ));
}
