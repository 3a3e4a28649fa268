//! Sessions: one logged-in vim25 session per distinct (URL, user, TLS
//! policy), opened lazily and shared by every provisioning that uses it.
//!
//! The session is the transport seam (govmomi's `RoundTripper`): re-login on
//! `NotAuthenticated`, bounded retries of transient failures and the circuit
//! breaker all live here, not at call sites.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::VsphereError;
use rand::Rng;
use tracing::Instrument;

use crate::breaker::Breaker;
use crate::soap::{Envelope, Node, Response, read_response};
use crate::tls::{TlsPolicy, client_config};
use crate::types::{MoRef, ServiceContent};

/// The session cookie vCenter and vcsim set on `Login`.
pub const SESSION_COOKIE: &str = "vmware_soap_session";
/// SOAPAction header value: the vim25 release the requests are written for.
const SOAP_ACTION: &str = "urn:vim25/6.5";

/// Tunables of the SOAP client.
#[derive(Clone, Debug)]
pub struct SoapOptions {
    /// Timeout of one HTTP request (long-polls add their own wait on top).
    pub request_timeout: Duration,
    /// Ceiling on how long one vSphere task (clone, reconfigure, power-on)
    /// may take; each VM's own limit is `VmSpec::task_timeout` (the
    /// tenant's `timeouts.task_secs`), and the shorter one applies.
    pub task_timeout: Duration,
    /// Retries of a call that failed with a retryable error (transport,
    /// timeout). `0` disables retries.
    pub max_retries: u32,
    /// First retry delay; doubled per attempt (with jitter), capped at
    /// [`SoapOptions::max_retry_delay`].
    pub retry_base_delay: Duration,
    /// Largest retry delay.
    pub max_retry_delay: Duration,
    /// Consecutive transport failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker fails calls fast before a probe.
    pub breaker_cooldown: Duration,
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
            task_timeout: Duration::from_secs(30 * 60),
            max_retries: 3,
            retry_base_delay: Duration::from_millis(200),
            max_retry_delay: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            wait_max_seconds: 60,
            guest_domain: "localdomain".into(),
        }
    }
}

/// Who a session is for. The password is not part of the key: a changed
/// password re-logs the same session in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EndpointKey {
    url: String,
    username: String,
    tls: TlsPolicy,
}

#[derive(Clone, Debug)]
struct LoggedIn {
    cookie: String,
    content: ServiceContent,
    generation: u64,
}

/// One vCenter session.
pub struct Session {
    url: String,
    username: String,
    password: Mutex<Secret>,
    http: reqwest::Client,
    breaker: Breaker,
    state: tokio::sync::Mutex<Option<LoggedIn>>,
    generation: AtomicU64,
    options: Arc<SoapOptions>,
    requests: Arc<AtomicU64>,
    /// Caches of resolved inventory, keyed by what was asked.
    pub(crate) cache: Mutex<HashMap<String, crate::adapter::Cached>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn transport_error(err: &reqwest::Error, method: &str) -> VsphereError {
    if let Some(message) = tls_cause(err) {
        return VsphereError::Tls { message };
    }
    if err.is_timeout() {
        return VsphereError::Timeout {
            operation: format!("the {method} call"),
        };
    }
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
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

impl Session {
    pub(crate) fn new(
        endpoint: &VcenterEndpoint,
        tls: &TlsPolicy,
        options: Arc<SoapOptions>,
        requests: Arc<AtomicU64>,
    ) -> Result<Self, VsphereError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("dvmm-vsphere/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(32);
        if let Some(config) = client_config(tls)? {
            builder = builder.use_preconfigured_tls(config);
        }
        let http = builder.build().map_err(|e| VsphereError::Tls {
            message: format!("failed to build the HTTPS client: {e}"),
        })?;
        Ok(Self {
            url: endpoint.url.trim().to_owned(),
            username: endpoint.username.clone(),
            password: Mutex::new(endpoint.password.clone()),
            http,
            breaker: Breaker::new(options.breaker_threshold, options.breaker_cooldown),
            state: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            options,
            requests,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn key(endpoint: &VcenterEndpoint) -> Result<EndpointKey, VsphereError> {
        Ok(EndpointKey {
            url: endpoint.url.trim().to_owned(),
            username: endpoint.username.clone(),
            tls: TlsPolicy::from_endpoint(endpoint.insecure, endpoint.thumbprint.as_deref())?,
        })
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The options in force.
    pub fn options(&self) -> &SoapOptions {
        &self.options
    }

    pub(crate) fn update_password(&self, password: &Secret) {
        let mut current = self.password.lock().unwrap_or_else(|e| e.into_inner());
        if current.expose() != password.expose() {
            *current = password.clone();
        }
    }

    /// One HTTP round trip, no re-login, no retry.
    async fn post(
        &self,
        method: &'static str,
        body: &str,
        cookie: Option<&str>,
        timeout: Duration,
    ) -> Result<(Response, Option<String>), VsphereError> {
        if !self.breaker.allow() {
            return Err(VsphereError::CircuitOpen {
                endpoint: self.url.clone(),
            });
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION)
            .timeout(timeout)
            .body(body.to_owned());
        if let Some(cookie) = cookie {
            request = request.header(
                reqwest::header::COOKIE,
                format!("{SESSION_COOKIE}={cookie}"),
            );
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = transport_error(&e, method);
                if !matches!(err, VsphereError::Tls { .. }) {
                    self.breaker.failure();
                }
                return Err(err);
            }
        };
        let status = response.status();
        let set_cookie = response
            .headers()
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
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                self.breaker.failure();
                return Err(transport_error(&e, method));
            }
        };
        self.breaker.success();
        match read_response(&bytes) {
            Ok(r) => Ok((r, set_cookie)),
            Err(e) if status.is_server_error() && status.as_u16() != 500 => {
                Err(VsphereError::Transport {
                    message: format!("HTTP {status} from vCenter ({e})"),
                })
            }
            Err(e) => Err(VsphereError::Protocol {
                message: format!("{method}: HTTP {status}: {e}"),
            }),
        }
    }

    async fn login_locked(&self, slot: &mut Option<LoggedIn>) -> Result<LoggedIn, VsphereError> {
        let timeout = self.options.request_timeout;
        let mut env = Envelope::new("RetrieveServiceContent");
        env.moref("_this", "ServiceInstance", "ServiceInstance");
        let (response, _) = self
            .post("RetrieveServiceContent", &env.finish(), None, timeout)
            .await?;
        let content = match response {
            Response::Ok(node) => node
                .child("returnval")
                .and_then(ServiceContent::from_node)
                .ok_or_else(|| VsphereError::Protocol {
                    message: "RetrieveServiceContent returned no usable ServiceContent".into(),
                })?,
            Response::Fault(f) => return Err(f.into_error(&self.username)),
        };
        let body = {
            let password = self.password.lock().unwrap_or_else(|e| e.into_inner());
            let mut env = Envelope::new("Login");
            env.moref(
                "_this",
                &content.session_manager.kind,
                &content.session_manager.value,
            )
            .text("userName", &self.username)
            .text("password", password.expose());
            env.finish()
        };
        let span = tracing::debug_span!("soap", method = "Login", user = %self.username);
        let (response, cookie) = self
            .post("Login", &body, None, timeout)
            .instrument(span)
            .await?;
        drop(body);
        if let Response::Fault(f) = response {
            return Err(f.into_error(&self.username));
        }
        let cookie = cookie.ok_or_else(|| VsphereError::Protocol {
            message: format!("Login answered without a {SESSION_COOKIE} cookie"),
        })?;
        let logged = LoggedIn {
            cookie,
            content,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        tracing::info!(url = %self.url, user = %self.username, "logged in to vCenter");
        *slot = Some(logged.clone());
        Ok(logged)
    }

    async fn current(&self) -> Result<LoggedIn, VsphereError> {
        let mut slot = self.state.lock().await;
        match &*slot {
            Some(l) => Ok(l.clone()),
            None => self.login_locked(&mut slot).await,
        }
    }

    /// Logs in again unless another caller already did since `generation`.
    async fn relogin(&self, generation: u64) -> Result<LoggedIn, VsphereError> {
        let mut slot = self.state.lock().await;
        match &*slot {
            Some(l) if l.generation != generation => Ok(l.clone()),
            _ => {
                tracing::info!(url = %self.url, "vCenter session expired, logging in again");
                self.login_locked(&mut slot).await
            }
        }
    }

    /// The session's service content (logging in first if needed).
    ///
    /// # Errors
    /// Login failures.
    pub async fn content(&self) -> Result<ServiceContent, VsphereError> {
        Ok(self.current().await?.content)
    }

    /// Sends one call with the session cookie; logs in again once when the
    /// server says the session is gone (as a fault, or inside a
    /// `RetrievePropertiesEx` `missingSet` with HTTP 200).
    async fn call_once(
        &self,
        method: &'static str,
        body: &str,
        timeout: Duration,
    ) -> Result<Node, VsphereError> {
        let mut logged = self.current().await?;
        let mut relogged = false;
        loop {
            let (response, _) = self
                .post(method, body, Some(&logged.cookie), timeout)
                .await?;
            let result = match response {
                Response::Ok(node) => {
                    if method == "RetrievePropertiesEx" && missing_not_authenticated(&node) {
                        Err(VsphereError::NotAuthenticated)
                    } else {
                        Ok(node)
                    }
                }
                Response::Fault(f) => Err(f.into_error(&self.username)),
            };
            match result {
                Err(VsphereError::NotAuthenticated) if !relogged => {
                    relogged = true;
                    logged = self.relogin(logged.generation).await?;
                }
                other => return other,
            }
        }
    }

    /// Calls `method` with the body the closure writes (it gets the
    /// service content to address managed objects). Retryable failures are
    /// retried with exponential backoff and jitter when `retry` is set.
    ///
    /// # Errors
    /// The mapped fault or transport error.
    pub async fn call(
        &self,
        method: &'static str,
        retry: bool,
        extra_timeout: Duration,
        body: impl Fn(&ServiceContent, &mut Envelope),
    ) -> Result<Node, VsphereError> {
        let timeout = self.options.request_timeout + extra_timeout;
        let attempts = if retry {
            self.options.max_retries + 1
        } else {
            1
        };
        let mut attempt = 0;
        let mut last_transport: Option<VsphereError> = None;
        loop {
            attempt += 1;
            let started = Instant::now();
            let span = tracing::debug_span!(
                "soap",
                method,
                attempt,
                duration_ms = tracing::field::Empty,
                fault = tracing::field::Empty
            );
            // The body is written per attempt: a re-login may have changed
            // the service content it refers to.
            let result = async {
                let content = self.content().await?;
                let mut env = Envelope::new(method);
                body(&content, &mut env);
                self.call_once(method, &env.finish(), timeout).await
            }
            .instrument(span.clone())
            .await;
            span.record("duration_ms", started.elapsed().as_millis() as u64);
            match &result {
                Ok(_) => return result,
                Err(VsphereError::CircuitOpen { .. }) if last_transport.is_some() => {
                    // Our own failures just opened the breaker: the transport
                    // error says more about what happened than "open".
                    return Err(last_transport.take().unwrap_or_else(|| {
                        VsphereError::CircuitOpen {
                            endpoint: self.url.clone(),
                        }
                    }));
                }
                Err(err) => {
                    span.record("fault", err.code());
                    let retryable = matches!(
                        err,
                        VsphereError::Transport { .. } | VsphereError::Timeout { .. }
                    );
                    if !retryable || attempt >= attempts {
                        tracing::debug!(parent: &span, error = %err, "SOAP call failed");
                        return result;
                    }
                    last_transport = Some(err.clone());
                    let delay = self.backoff(attempt);
                    tracing::debug!(parent: &span, error = %err, ?delay, "retrying SOAP call");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.options.retry_base_delay.as_secs_f64();
        let cap = self.options.max_retry_delay.as_secs_f64();
        let full = (base * 2f64.powi(attempt.saturating_sub(1) as i32)).min(cap);
        // "Equal jitter": half fixed, half random, so retries of many callers
        // spread out but never fire immediately.
        let jittered = full / 2.0 + rand::thread_rng().gen_range(0.0..=full / 2.0);
        Duration::from_secs_f64(jittered)
    }

    /// Logs the session out (if logged in).
    ///
    /// # Errors
    /// Transport failures; a session the server already dropped is fine.
    pub async fn logout(&self) -> Result<(), VsphereError> {
        let mut slot = self.state.lock().await;
        let Some(logged) = slot.take() else {
            return Ok(());
        };
        let mut env = Envelope::new("Logout");
        env.moref(
            "_this",
            &logged.content.session_manager.kind,
            &logged.content.session_manager.value,
        );
        let (response, _) = self
            .post(
                "Logout",
                &env.finish(),
                Some(&logged.cookie),
                self.options.request_timeout,
            )
            .await?;
        match response {
            Response::Ok(_) => Ok(()),
            Response::Fault(f) if f.kind == "NotAuthenticated" => Ok(()),
            Response::Fault(f) => Err(f.into_error(&self.username)),
        }
    }
}

pub(crate) fn missing_not_authenticated(response: &Node) -> bool {
    let Some(returnval) = response.child("returnval") else {
        return false;
    };
    returnval.children_named("objects").any(|o| {
        o.children_named("missingSet").any(|m| {
            m.child("fault")
                .is_some_and(|f| crate::soap::Fault::from_localized(f).kind == "NotAuthenticated")
        })
    })
}

/// Sessions by endpoint.
#[derive(Debug, Default)]
pub(crate) struct SessionPool {
    sessions: Mutex<HashMap<EndpointKey, Arc<Session>>>,
}

impl SessionPool {
    pub(crate) fn get(
        &self,
        endpoint: &VcenterEndpoint,
        options: &Arc<SoapOptions>,
        requests: &Arc<AtomicU64>,
    ) -> Result<Arc<Session>, VsphereError> {
        let key = Session::key(endpoint)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get(&key) {
            s.update_password(&endpoint.password);
            return Ok(s.clone());
        }
        let session = Arc::new(Session::new(
            endpoint,
            &key.tls,
            options.clone(),
            requests.clone(),
        )?);
        sessions.insert(key, session.clone());
        Ok(session)
    }

    pub(crate) fn drain(&self) -> Vec<Arc<Session>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.drain().map(|(_, s)| s).collect()
    }
}

/// A reference written as `_this`.
pub(crate) fn this(env: &mut Envelope, obj: &MoRef) {
    env.moref("_this", &obj.kind, &obj.value);
}
