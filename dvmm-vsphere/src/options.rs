//! [`SoapOptions`]: the tunables of the SOAP client, read by every layer of
//! the transport stack.

use std::time::Duration;

use dvmm_core::backoff::Backoff;

/// Tunables of the SOAP client.
#[derive(Clone, Debug)]
pub struct SoapOptions {
    /// Total deadline of one call: connecting, sending, and reading the
    /// whole answer, so a server that trickles its answer cannot hold a call
    /// longer than this. Long polls get their own (see
    /// [`SoapOptions::long_poll_margin`]).
    pub request_timeout: Duration,
    /// Added to a long poll's `maxWaitSeconds` to make its deadline: the
    /// server may answer that much after its own wait ended.
    pub long_poll_margin: Duration,
    /// Largest answer read, in bytes. Enforced while the body streams in,
    /// so no more than this is ever held; a larger answer fails the call
    /// with `AnswerTooLarge`.
    pub max_answer_bytes: u64,
    /// Most `ContinueRetrievePropertiesEx` pages followed for one
    /// retrieval; a server that keeps handing out tokens fails the call
    /// instead of growing the result without end.
    pub max_continuation_pages: u32,
    /// Ceiling on how long one vSphere task (clone, reconfigure, power-on)
    /// may take; each VM's own limit is `VmSpec::task_timeout` (the
    /// tenant's `timeouts.task_secs`), and the shorter one applies.
    pub task_timeout: Duration,
    /// Retries of a call that is safe to repeat after a transport failure
    /// (the endpoint could not be reached, the connection broke, or the
    /// call's deadline passed). `0` disables retries.
    pub max_retries: u32,
    /// First retry delay; doubled per retry (with jitter), capped at
    /// [`SoapOptions::max_retry_delay`].
    pub retry_base_delay: Duration,
    /// Largest retry delay.
    pub max_retry_delay: Duration,
    /// Consecutive transport failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker fails calls fast before a probe.
    pub breaker_cooldown: Duration,
    /// How long a half-open probe may stay unsettled before another call
    /// may probe instead: a probe that hangs must not keep the breaker
    /// closed to everyone.
    pub probe_deadline: Duration,
    /// First pause after a refused `Login` during which further logins with
    /// the same credentials fail at once (doubling per refusal, up to
    /// [`SoapOptions::login_backoff_max`]), so a queue of jobs cannot lock
    /// the account in vCenter SSO.
    pub login_backoff_base: Duration,
    /// Longest pause after refused logins.
    pub login_backoff_max: Duration,
    /// Longest server-side wait of one `WaitForUpdatesEx` long-poll.
    pub wait_max_seconds: u32,
    /// Domain name written into the Linux guest customization (vim25
    /// requires one).
    pub guest_domain: String,
}

impl Default for SoapOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            long_poll_margin: Duration::from_secs(15),
            max_answer_bytes: 64 * 1024 * 1024,
            max_continuation_pages: 1000,
            task_timeout: Duration::from_secs(30 * 60),
            max_retries: 3,
            retry_base_delay: Duration::from_millis(200),
            max_retry_delay: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            probe_deadline: Duration::from_secs(10),
            login_backoff_base: Duration::from_secs(30),
            login_backoff_max: Duration::from_secs(15 * 60),
            wait_max_seconds: 60,
            guest_domain: "localdomain".into(),
        }
    }
}

impl SoapOptions {
    /// The delays between retries of one call.
    pub fn retry_backoff(&self) -> Backoff {
        Backoff::new(self.retry_base_delay, self.max_retry_delay)
    }

    /// The pauses after refused logins.
    pub fn login_backoff(&self) -> Backoff {
        Backoff::new(self.login_backoff_base, self.login_backoff_max)
    }

    /// The deadline of a call that waits up to `server_wait` on the server
    /// (a long poll), or of an ordinary call when that is zero.
    pub fn deadline(&self, server_wait: Duration) -> Duration {
        if server_wait.is_zero() {
            self.request_timeout
        } else {
            server_wait.saturating_add(self.long_poll_margin)
        }
    }
}
