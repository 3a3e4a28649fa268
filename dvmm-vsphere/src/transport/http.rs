//! [`HttpTransport`]: the bottom of the stack, on reqwest. It owns what is
//! about one HTTP connection to one endpoint: TLS, the session cookie, the
//! call's total deadline and the answer size cap.

use std::sync::Mutex;
use std::time::Duration;

use dvmm_core::ports::VsphereError;

use super::{BoxFuture, Call, Transport};
use crate::soap::{Response, read_response};
use crate::tls::{TlsPolicy, client_config};

/// The session cookie vCenter and vcsim set on `Login`.
pub const SESSION_COOKIE: &str = "vmware_soap_session";
/// SOAPAction header value: the vim25 release the requests are written for.
const SOAP_ACTION: &str = "urn:vim25/6.5";
/// Answers larger than this are parsed on the blocking pool: a 64 MiB
/// answer takes a few hundred milliseconds to read, too long to hold an
/// async worker thread.
const PARSE_INLINE_MAX: usize = 256 * 1024;

/// SOAP over HTTP(S) to one endpoint.
pub struct HttpTransport {
    url: String,
    client: reqwest::Client,
    cookie: Mutex<Option<String>>,
    max_answer_bytes: u64,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the cookie (a bearer token) nor the client's internals.
        f.debug_struct("HttpTransport")
            .field("url", &self.url)
            .field("max_answer_bytes", &self.max_answer_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// A transport to `url` with that certificate policy, reading at most
    /// `max_answer_bytes` of any answer.
    ///
    /// # Errors
    /// [`VsphereError::Tls`] when the TLS client cannot be built.
    pub fn new(url: &str, tls: &TlsPolicy, max_answer_bytes: u64) -> Result<Self, VsphereError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("dvmm-vsphere/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(32)
            .tls_backend_preconfigured(client_config(tls)?)
            .build()
            .map_err(|e| VsphereError::Tls {
                message: format!("failed to build the HTTPS client: {}", e.without_url()),
            })?;
        Ok(Self {
            url: url.trim().to_owned(),
            client,
            cookie: Mutex::new(None),
            max_answer_bytes,
        })
    }

    fn cookie(&self) -> Option<String> {
        self.cookie
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn remember_cookie(&self, headers: &reqwest::header::HeaderMap) {
        let found = headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()
                    .and_then(|kv| kv.trim().strip_prefix(SESSION_COOKIE))
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(str::to_owned)
            });
        if let Some(cookie) = found {
            *self.cookie.lock().unwrap_or_else(|e| e.into_inner()) = Some(cookie);
        }
    }

    async fn exchange(&self, call: &Call) -> Result<Response, VsphereError> {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION)
            .body(call.body.clone());
        if let Some(cookie) = self.cookie() {
            request = request.header(
                reqwest::header::COOKIE,
                format!("{SESSION_COOKIE}={cookie}"),
            );
        }
        let mut response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        self.remember_cookie(response.headers());
        if matches!(status.as_u16(), 502..=504) {
            // A proxy or load balancer in front of a vCenter that is away.
            return Err(VsphereError::Transport {
                message: format!("HTTP {status} to {}: vCenter is unavailable", call.method),
            });
        }
        let limit = self.max_answer_bytes;
        let too_large = || VsphereError::AnswerTooLarge { limit_bytes: limit };
        let announced = response.content_length();
        if announced.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        // Never reserve more than a modest start: the announced length is
        // the server's word.
        let start = announced.unwrap_or(0).min(1 << 20) as usize;
        let mut body = Vec::with_capacity(start);
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let parsed = if body.len() > PARSE_INLINE_MAX {
            tokio::task::spawn_blocking(move || read_response(&body))
                .await
                .map_err(|e| VsphereError::Protocol {
                    message: format!("reading the answer to {} failed: {e}", call.method),
                })?
        } else {
            read_response(&body)
        };
        match parsed {
            Ok(response) => Ok(response),
            Err(e) if status.is_server_error() && status.as_u16() != 500 => {
                Err(VsphereError::Transport {
                    message: format!("HTTP {status} to {} ({e})", call.method),
                })
            }
            Err(e) => Err(VsphereError::Protocol {
                message: format!("{}: HTTP {status}: {e}", call.method),
            }),
        }
    }
}

impl Transport for HttpTransport {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        Box::pin(async move {
            // One deadline over connect, send and the whole body: a server
            // that trickles its answer is cut off here.
            match tokio::time::timeout(call.deadline, self.exchange(call)).await {
                Ok(result) => result,
                Err(_) => Err(VsphereError::Transport {
                    message: format!(
                        "no complete answer to {} within its deadline of {:?}",
                        call.method, call.deadline
                    ),
                }),
            }
        })
    }
}

fn transport_error(err: reqwest::Error) -> VsphereError {
    // The URL stays out of messages that may reach users.
    let err = err.without_url();
    if let Some(message) = tls_cause(&err) {
        return VsphereError::Tls { message };
    }
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    VsphereError::Transport { message }
}

/// Finds a TLS failure in the chain. rustls' error hides inside an
/// `io::Error` whose `source()` skips it, so both the typed error and the
/// messages are checked.
fn tls_cause(err: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut texts = Vec::new();
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(describe_tls(&tls.to_string()));
        }
        if let Some(tls) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Some(describe_tls(&tls.to_string()));
        }
        texts.push(cause.to_string());
        source = cause.source();
    }
    texts
        .iter()
        .find(|t| {
            t.contains("invalid peer certificate")
                || t.contains("certificate thumbprint")
                || t.contains("received fatal alert")
                || t.contains("HandshakeFailure")
        })
        .map(|t| {
            // Keep the innermost, most specific part of the message.
            let specific = t.rsplit("): ").next().unwrap_or(t);
            describe_tls(specific)
        })
}

fn describe_tls(message: &str) -> String {
    if message.contains("invalid peer certificate") {
        format!(
            "{message}; vCenter's certificate is not trusted: install a trusted certificate, \
             or set the endpoint's SHA-256 thumbprint (or insecure for labs)"
        )
    } else {
        message.to_owned()
    }
}
