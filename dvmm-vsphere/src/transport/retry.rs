//! [`Retry`]: the one layer that retries a call after a transport failure,
//! and only a call that is safe to repeat.

use std::sync::Arc;

use dvmm_core::backoff::Backoff;
use dvmm_core::ports::VsphereError;
use tracing::Instrument;

use super::{BoxFuture, Call, Transport};
use crate::soap::Response;

/// Retries [`VsphereError::Transport`] failures of idempotent calls up to
/// `max_retries` times, waiting [`Backoff::delay`] between tries. Faults,
/// TLS failures, answers that are too large or not SOAP, and calls that are
/// not idempotent (such as `CloneVM_Task`) go up at once.
#[derive(Debug)]
pub struct Retry {
    inner: Arc<dyn Transport>,
    max_retries: u32,
    backoff: Backoff,
}

impl Retry {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Transport>, max_retries: u32, backoff: Backoff) -> Self {
        Self {
            inner,
            max_retries,
            backoff,
        }
    }

    async fn run(&self, call: &Call) -> Result<Response, VsphereError> {
        let mut retry = 0u32;
        let mut last_transport: Option<VsphereError> = None;
        loop {
            let span =
                tracing::debug_span!("soap_attempt", method = call.method, attempt = retry + 1);
            let result = self.inner.round_trip(call).instrument(span.clone()).await;
            match result {
                Err(open @ VsphereError::CircuitOpen { .. }) => {
                    // When our own failures just opened the breaker, the
                    // transport error says more about what happened.
                    return Err(last_transport.unwrap_or(open));
                }
                Err(err @ VsphereError::Transport { .. })
                    if call.idempotent && retry < self.max_retries =>
                {
                    retry += 1;
                    let delay = self.backoff.delay(retry);
                    tracing::debug!(parent: &span, error = %err, ?delay, "retrying SOAP call");
                    last_transport = Some(err);
                    tokio::time::sleep(delay).await;
                }
                other => {
                    if let Err(err) = &other {
                        tracing::debug!(parent: &span, error = %err, "SOAP call failed");
                    }
                    return other;
                }
            }
        }
    }
}

impl Transport for Retry {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        Box::pin(self.run(call))
    }
}
