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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dvmm_core::backoff::FixedJitter;
    use tokio::time::Instant;

    use super::*;
    use crate::transport::scripted::{ScriptedTransport, Step};

    fn call(idempotent: bool) -> Call {
        Call {
            method: "RetrievePropertiesEx",
            body: String::new(),
            deadline: Duration::from_secs(60),
            idempotent,
        }
    }

    fn retry(script: &ScriptedTransport) -> Retry {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(FixedJitter(1.0));
        Retry::new(Arc::new(script.clone()), 3, backoff)
    }

    #[tokio::test(start_paused = true)]
    async fn transport_failures_of_repeatable_calls_wait_the_backoff_between_tries() {
        let script = ScriptedTransport::new();
        for _ in 0..3 {
            script.push("RetrievePropertiesEx", Step::transport("connection reset"));
        }
        script.push("RetrievePropertiesEx", Step::ok("RetrievePropertiesEx", ""));
        let started = Instant::now();
        let answer = retry(&script).round_trip(&call(true)).await;
        assert!(matches!(answer, Ok(Response::Ok(_))), "{answer:?}");
        assert_eq!(script.count("RetrievePropertiesEx"), 4);
        assert_eq!(started.elapsed(), Duration::from_millis(100 + 200 + 400));

        // One more failure than retries: the last error goes up.
        let script = ScriptedTransport::new();
        for _ in 0..5 {
            script.push("RetrievePropertiesEx", Step::transport("connection reset"));
        }
        let answer = retry(&script).round_trip(&call(true)).await;
        assert!(matches!(answer, Err(VsphereError::Transport { .. })));
        assert_eq!(script.count("RetrievePropertiesEx"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_else_is_retried() {
        let failures = [
            (Step::transport("connection reset"), false),
            (Step::fault("NoPermission"), true),
            (
                Step::Error(VsphereError::Tls {
                    message: "bad certificate".into(),
                }),
                true,
            ),
            (
                Step::Error(VsphereError::AnswerTooLarge { limit_bytes: 10 }),
                true,
            ),
            (
                Step::Error(VsphereError::CircuitOpen {
                    endpoint: "vc".into(),
                }),
                true,
            ),
        ];
        for (step, idempotent) in failures {
            let script = ScriptedTransport::new();
            script.push("RetrievePropertiesEx", step.clone());
            let _ = retry(&script).round_trip(&call(idempotent)).await;
            assert_eq!(script.count("RetrievePropertiesEx"), 1, "{step:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_opened_by_our_failures_reports_the_transport_error() {
        let script = ScriptedTransport::new();
        script
            .push(
                "RetrievePropertiesEx",
                Step::transport("connection refused"),
            )
            .push(
                "RetrievePropertiesEx",
                Step::Error(VsphereError::CircuitOpen {
                    endpoint: "vc".into(),
                }),
            );
        let answer = retry(&script).round_trip(&call(true)).await;
        assert!(
            matches!(&answer, Err(VsphereError::Transport { message }) if message == "connection refused"),
            "{answer:?}"
        );
    }
}
