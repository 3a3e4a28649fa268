//! A circuit breaker per vCenter endpoint: after `threshold` consecutive
//! failures calls fail fast with `CircuitOpen` for `cooldown`; then one
//! probe call is let through (half-open) and its outcome closes or reopens
//! it.
//!
//! The probe is always settled, so the breaker always recovers: a probe
//! that fails in any way (refused, reset, TLS, HTTP 502/503/504, deadline)
//! reopens it, a probe whose future is dropped counts as failed, and a
//! probe that has not settled after `probe_deadline` lets another call
//! probe instead. Time is tokio's, so tests run it on paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::ports::VsphereError;
use tokio::time::Instant;

use crate::soap::Response;
use crate::transport::{BoxFuture, Call, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe: u64, since: Instant },
}

#[derive(Debug)]
struct Inner {
    state: State,
    next_probe: u64,
}

/// Breaker state shared by all calls to one endpoint.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    threshold: u32,
    cooldown: Duration,
    probe_deadline: Duration,
}

/// Leave to send one call. Settle it with [`Permit::success`] or
/// [`Permit::failure`]; dropping a probe's permit unsettled counts as a
/// failure.
#[derive(Debug)]
#[must_use = "a permit must be settled with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: Option<u64>,
    settled: bool,
}

impl Permit<'_> {
    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// The server answered (even with a fault).
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.succeeded();
    }

    /// The server could not be used.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.failed(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe.is_some() {
            // A probe cancelled before its answer proves nothing about the
            // endpoint; treating it as failed reopens the breaker for one
            // cool-down, after which another call probes.
            self.breaker.failed(self.probe);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration, probe_deadline: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                next_probe: 0,
            }),
            threshold: threshold.max(1),
            cooldown,
            probe_deadline,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the state invalid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leave to send a call now, or `None` to fail fast. After the
    /// cool-down the first caller becomes the probe; the others keep
    /// failing fast until it settles or its deadline passes.
    pub fn admit(&self) -> Option<Permit<'_>> {
        let mut inner = self.lock();
        let now = Instant::now();
        let probe = match inner.state {
            State::Closed { .. } => None,
            State::Open { until } if now >= until => Some(()),
            State::HalfOpen { since, .. } if now >= since + self.probe_deadline => {
                tracing::debug!("breaker probe did not settle in time; probing again");
                Some(())
            }
            State::Open { .. } | State::HalfOpen { .. } => return None,
        };
        let probe = probe.map(|()| {
            inner.next_probe += 1;
            let id = inner.next_probe;
            inner.state = State::HalfOpen {
                probe: id,
                since: now,
            };
            id
        });
        Some(Permit {
            breaker: self,
            probe,
            settled: false,
        })
    }

    fn succeeded(&self) {
        // Any answer shows the endpoint is back, whoever got it.
        self.lock().state = State::Closed { failures: 0 };
    }

    fn failed(&self, probe: Option<u64>) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.state = match (inner.state, probe) {
            (State::HalfOpen { probe: current, .. }, Some(p)) if p == current => State::Open {
                until: now + self.cooldown,
            },
            // A probe that was given up on (another probed since) or a call
            // sent before the breaker opened: the breaker already knows.
            (state, Some(_)) | (state @ (State::Open { .. } | State::HalfOpen { .. }), None) => {
                state
            }
            (State::Closed { failures }, _) if failures + 1 >= self.threshold => State::Open {
                until: now + self.cooldown,
            },
            (State::Closed { failures }, _) => State::Closed {
                failures: failures + 1,
            },
        };
    }

    /// Whether calls currently fail fast.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        match inner.state {
            State::Closed { .. } => false,
            State::Open { until } => now < until,
            State::HalfOpen { since, .. } => now < since + self.probe_deadline,
        }
    }

    /// Whether the breaker is closed (calls flow normally).
    pub fn is_closed(&self) -> bool {
        matches!(self.lock().state, State::Closed { .. })
    }
}

/// Whether a call's outcome says the endpoint cannot be used: what opens
/// the breaker. A fault, or an answer that is too large or not SOAP, is an
/// answer.
fn endpoint_failed(result: &Result<Response, VsphereError>) -> bool {
    matches!(
        result,
        Err(VsphereError::Transport { .. } | VsphereError::Tls { .. })
    )
}

/// The breaker as a layer of the transport stack.
#[derive(Debug)]
pub struct BreakerTransport {
    inner: Arc<dyn Transport>,
    breaker: Arc<Breaker>,
    endpoint: String,
}

impl BreakerTransport {
    /// Guards `inner` with `breaker`; `endpoint` names it in `CircuitOpen`.
    pub fn new(inner: Arc<dyn Transport>, breaker: Arc<Breaker>, endpoint: &str) -> Self {
        Self {
            inner,
            breaker,
            endpoint: endpoint.to_owned(),
        }
    }
}

impl Transport for BreakerTransport {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        Box::pin(async move {
            let Some(permit) = self.breaker.admit() else {
                self.report_state();
                return Err(VsphereError::CircuitOpen {
                    endpoint: self.endpoint.clone(),
                });
            };
            if permit.is_probe() {
                tracing::info!(
                    method = call.method,
                    "probing vCenter after the breaker's cool-down"
                );
            }
            let result = self.inner.round_trip(call).await;
            if endpoint_failed(&result) {
                permit.failure();
            } else {
                permit.success();
            }
            self.report_state();
            result
        })
    }
}

impl BreakerTransport {
    /// Sets [`dvmm_core::telemetry::VSPHERE_BREAKER_OPEN`] for this endpoint.
    fn report_state(&self) {
        let open = if self.breaker.is_closed() { 0.0 } else { 1.0 };
        metrics::gauge!(
            dvmm_core::telemetry::VSPHERE_BREAKER_OPEN,
            "endpoint" => dvmm_core::config::endpoint_key(&self.endpoint)
        )
        .set(open);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::scripted::{ScriptedTransport, Step};

    const COOLDOWN: Duration = Duration::from_secs(30);
    const PROBE_DEADLINE: Duration = Duration::from_secs(10);

    fn stack(script: &ScriptedTransport) -> (Arc<Breaker>, BreakerTransport) {
        let breaker = Arc::new(Breaker::new(2, COOLDOWN, PROBE_DEADLINE));
        let layer = BreakerTransport::new(Arc::new(script.clone()), breaker.clone(), "vc");
        (breaker, layer)
    }

    fn call() -> Call {
        Call {
            method: "FindByInventoryPath",
            body: String::new(),
            deadline: Duration::from_secs(60),
            idempotent: true,
        }
    }

    fn found() -> Step {
        Step::ok("FindByInventoryPath", "")
    }

    async fn send(layer: &BreakerTransport) -> Result<Response, VsphereError> {
        tokio::time::timeout(Duration::from_secs(120), layer.round_trip(&call()))
            .await
            .expect("a breaker call ended within its deadline")
    }

    /// Two refused calls open it; a third fails fast without being sent.
    async fn open(script: &ScriptedTransport, layer: &BreakerTransport, breaker: &Breaker) {
        script
            .push("FindByInventoryPath", Step::transport("connection refused"))
            .push("FindByInventoryPath", Step::transport("connection refused"));
        assert!(send(layer).await.is_err());
        assert!(breaker.is_closed(), "one failure is below the threshold");
        assert!(send(layer).await.is_err());
        let sent = script.requests().len();
        assert!(matches!(
            send(layer).await,
            Err(VsphereError::CircuitOpen { .. })
        ));
        assert_eq!(
            script.requests().len(),
            sent,
            "an open breaker sends nothing"
        );
    }

    /// The probe failed: the breaker is open again, and once the endpoint is
    /// back it closes within one cool-down.
    async fn recovers(script: &ScriptedTransport, layer: &BreakerTransport, breaker: &Breaker) {
        assert!(breaker.is_open(), "a failed probe reopens the breaker");
        assert!(matches!(
            send(layer).await,
            Err(VsphereError::CircuitOpen { .. })
        ));
        tokio::time::sleep(COOLDOWN).await;
        script.push("FindByInventoryPath", found());
        assert!(send(layer).await.is_ok(), "the endpoint is back");
        assert!(breaker.is_closed(), "closed within one cool-down");
        script.push("FindByInventoryPath", found());
        assert!(send(layer).await.is_ok());
    }

    async fn probe_fails_with(step: Step) {
        let script = ScriptedTransport::new();
        let (breaker, layer) = stack(&script);
        open(&script, &layer, &breaker).await;
        tokio::time::sleep(COOLDOWN).await;
        script.push("FindByInventoryPath", step);
        assert!(send(&layer).await.is_err());
        recovers(&script, &layer, &breaker).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_on_a_reset_connection_reopens_and_recovers() {
        probe_fails_with(Step::transport("connection reset by peer")).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_with_a_tls_failure_reopens_and_recovers() {
        probe_fails_with(Step::Error(VsphereError::Tls {
            message: "invalid peer certificate".into(),
        }))
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_answered_by_a_proxy_503_reopens_and_recovers() {
        // What HttpTransport makes of 502/503/504 (tests/transport.rs checks
        // that mapping against a real socket).
        for status in [
            "502 Bad Gateway",
            "503 Service Unavailable",
            "504 Gateway Timeout",
        ] {
            probe_fails_with(Step::transport(&format!(
                "HTTP {status} to FindByInventoryPath: vCenter is unavailable"
            )))
            .await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_past_its_call_deadline_reopens_and_recovers() {
        probe_fails_with(Step::Hang).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_counts_as_failed_and_recovers() {
        let script = ScriptedTransport::new();
        let (breaker, layer) = stack(&script);
        open(&script, &layer, &breaker).await;
        tokio::time::sleep(COOLDOWN).await;
        script.push("FindByInventoryPath", Step::Hang);
        // The caller gives up on the probe (a long poll cancelled at its
        // deadline, a lost lease): its future is dropped mid-call.
        let cancelled =
            tokio::time::timeout(Duration::from_secs(1), layer.round_trip(&call())).await;
        assert!(cancelled.is_err(), "the probe was cancelled");
        recovers(&script, &layer, &breaker).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_settles_frees_the_breaker_after_the_probe_deadline() {
        let script = ScriptedTransport::new();
        let (breaker, layer) = stack(&script);
        let layer = Arc::new(layer);
        open(&script, &layer, &breaker).await;
        tokio::time::sleep(COOLDOWN).await;
        script.push("FindByInventoryPath", Step::Hang);
        let stuck = {
            let layer = layer.clone();
            tokio::spawn(async move { layer.round_trip(&call()).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(script.requests().len(), 3, "the probe was sent");
        assert!(matches!(
            send(&layer).await,
            Err(VsphereError::CircuitOpen { .. })
        ));
        // The endpoint is back, but the probe hangs (its deadline is a
        // minute away): after the probe deadline, another call probes.
        tokio::time::sleep(PROBE_DEADLINE).await;
        script.push("FindByInventoryPath", found());
        assert!(send(&layer).await.is_ok());
        assert!(breaker.is_closed(), "closed within one cool-down");
        stuck.abort();
        let _ = stuck.await;
        assert!(breaker.is_closed(), "the abandoned probe settles nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn faults_and_bad_answers_are_answers_not_outages() {
        let script = ScriptedTransport::new();
        let (breaker, layer) = stack(&script);
        for _ in 0..3 {
            script.push("FindByInventoryPath", Step::fault("NoPermission"));
            script.push(
                "FindByInventoryPath",
                Step::Error(VsphereError::AnswerTooLarge { limit_bytes: 1 }),
            );
        }
        for _ in 0..6 {
            let _ = send(&layer).await;
        }
        assert!(breaker.is_closed());
    }
}
