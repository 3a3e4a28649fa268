//! TLS policy: verification against the web PKI roots by default, opt-in
//! `insecure`, or SHA-256 thumbprint pinning for self-signed vCenters.

use std::sync::Arc;

use dvmm_core::ports::VsphereError;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// How the server certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Verify the chain and host name against the bundled web PKI roots.
    Verify,
    /// Accept exactly the certificate with this SHA-256 digest.
    Pinned([u8; 32]),
    /// Accept any certificate (labs only).
    Insecure,
}

impl TlsPolicy {
    /// The policy an endpoint asks for. A thumbprint wins over `insecure`:
    /// pinning is the stronger statement.
    ///
    /// # Errors
    /// [`VsphereError::Tls`] when the thumbprint is not 64 hex digits.
    pub fn from_endpoint(insecure: bool, thumbprint: Option<&str>) -> Result<Self, VsphereError> {
        match thumbprint.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => parse_thumbprint(t).map(Self::Pinned),
            None if insecure => Ok(Self::Insecure),
            None => Ok(Self::Verify),
        }
    }
}

/// Parses a SHA-256 thumbprint written as hex, with or without `:` separators.
///
/// # Errors
/// [`VsphereError::Tls`] when it is not 32 bytes of hex.
pub fn parse_thumbprint(text: &str) -> Result<[u8; 32], VsphereError> {
    let hex: Vec<u8> = text
        .bytes()
        .filter(|b| !matches!(b, b':' | b' ' | b'-'))
        .collect();
    let bad = || VsphereError::Tls {
        message: format!("the thumbprint {text:?} is not a SHA-256 fingerprint (64 hex digits)"),
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Formats a digest as colon-separated upper-case hex (how vCenter shows it).
pub fn format_thumbprint(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The SHA-256 thumbprint of a DER certificate.
pub fn thumbprint_of(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

#[derive(Debug)]
struct PinnedOrAny {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedOrAny {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let actual = thumbprint_of(end_entity.as_ref());
        if actual == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate thumbprint {} does not match the pinned thumbprint {}",
                format_thumbprint(&actual),
                format_thumbprint(&pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.pin.is_none() {
            // Insecure mode accepts weak keys too (vcsim's RSA-1024 default).
            return Ok(HandshakeSignatureValid::assertion());
        }
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.pin.is_none() {
            return Ok(HandshakeSignatureValid::assertion());
        }
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls configuration for a policy, on the ring provider: the bundled
/// web PKI roots (webpki-roots) for [`TlsPolicy::Verify`], the pinning or
/// accepting verifier otherwise.
///
/// # Errors
/// [`VsphereError::Tls`] when rustls rejects the protocol configuration.
pub fn client_config(policy: &TlsPolicy) -> Result<rustls::ClientConfig, VsphereError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| VsphereError::Tls {
            message: e.to_string(),
        })?;
    let pin = match policy {
        TlsPolicy::Verify => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            return Ok(builder.with_root_certificates(roots).with_no_client_auth());
        }
        TlsPolicy::Pinned(pin) => Some(*pin),
        TlsPolicy::Insecure => None,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedOrAny { pin, provider }))
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_parse_with_or_without_colons() {
        let digest = thumbprint_of(b"cert");
        let text = format_thumbprint(&digest);
        assert_eq!(parse_thumbprint(&text).unwrap(), digest);
        assert_eq!(
            parse_thumbprint(&text.replace(':', "").to_lowercase()).unwrap(),
            digest
        );
        assert!(matches!(
            parse_thumbprint("ab:cd"),
            Err(VsphereError::Tls { .. })
        ));
        assert!(parse_thumbprint(&"zz".repeat(32)).is_err());
        assert_eq!(
            TlsPolicy::from_endpoint(true, None).unwrap(),
            TlsPolicy::Insecure
        );
        assert_eq!(
            TlsPolicy::from_endpoint(false, Some(&text)).unwrap(),
            TlsPolicy::Pinned(digest)
        );
    }
}
