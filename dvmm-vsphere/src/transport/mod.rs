//! The transport stack under every SOAP call, in the shape of govmomi's
//! `RoundTripper`: one trait for one round trip, and decorators that each
//! own one concern.
//!
//! From the top, a [`Session`](crate::session::Session)'s calls go through:
//!
//! | layer | concern |
//! |---|---|
//! | [`crate::session`] | `RetrieveServiceContent` + `Login`, one re-login on `NotAuthenticated`, pauses after refused logins |
//! | [`retry::Retry`] | retries transport failures of calls that are safe to repeat, with [`Backoff`](dvmm_core::backoff::Backoff) |
//! | `breaker::BreakerTransport` (crate-private) | fails fast while the endpoint is down; one probe at a time, always settled |
//! | [`Counted`] | counts what is actually sent |
//! | [`http::HttpTransport`] (or [`scripted::ScriptedTransport`] in tests) | TLS, the session cookie, the call's total deadline, the answer size cap |
//!
//! No layer knows the ones above it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dvmm_core::ports::VsphereError;

use crate::soap::Response;

pub mod http;
pub mod retry;
pub mod scripted;

/// A boxed, sendable future: what a [`Transport`] returns, so that a whole
/// stack of layers is one type (`Arc<dyn Transport>`) picked at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One SOAP request, ready to send.
#[derive(Clone)]
pub struct Call {
    /// The vim25 method, e.g. `RetrievePropertiesEx`.
    pub method: &'static str,
    /// The whole request envelope.
    pub body: String,
    /// Total deadline of the round trip, the answer's body included.
    pub deadline: Duration,
    /// Whether sending it twice does no harm (reads, and writes of absolute
    /// values): only such calls are retried after a transport failure.
    pub idempotent: bool,
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The body is never shown: a Login body holds a password.
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("body_bytes", &self.body.len())
            .field("deadline", &self.deadline)
            .field("idempotent", &self.idempotent)
            .finish()
    }
}

/// One SOAP round trip: a request out, the decoded answer (a payload or a
/// SOAP fault) back, or a typed error when there is no usable answer.
///
/// Errors follow one rule so that the layers above can act on them: the
/// endpoint cannot be used right now (refused or reset connection, name
/// resolution, the call's deadline, HTTP 502/503/504) is
/// [`VsphereError::Transport`]; a certificate problem is
/// [`VsphereError::Tls`]; an answer over the size cap is
/// [`VsphereError::AnswerTooLarge`]; an answer that is not SOAP is
/// [`VsphereError::Protocol`].
pub trait Transport: Send + Sync + fmt::Debug {
    /// Sends `call` and reads its answer.
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>>;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        (**self).round_trip(call)
    }
}

/// Counts the requests that reach the layer below (after the breaker, so
/// calls it refused are not counted).
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn Transport>,
    requests: Arc<AtomicU64>,
}

impl Counted {
    /// Counts into `requests`.
    pub fn new(inner: Arc<dyn Transport>, requests: Arc<AtomicU64>) -> Self {
        Self { inner, requests }
    }
}

impl Transport for Counted {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = self.inner.round_trip(call).await;
            metrics::histogram!(
                dvmm_core::telemetry::VSPHERE_CALL_DURATION,
                "method" => call.method
            )
            .record(started.elapsed().as_secs_f64());
            let fault = match &result {
                Ok(Response::Ok(_)) => None,
                Ok(Response::Fault(fault)) => Some(fault.kind.clone()),
                Err(error) => Some(error.code().to_owned()),
            };
            if let Some(fault) = fault {
                metrics::counter!(
                    dvmm_core::telemetry::VSPHERE_FAULTS,
                    "method" => call.method,
                    "fault" => fault
                )
                .increment(1);
            }
            result
        })
    }
}
