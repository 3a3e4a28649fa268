//! Sessions: one logged-in vim25 session per distinct (URL, user, password
//! fingerprint, TLS policy), opened lazily and shared by every provisioning
//! that uses it.
//!
//! The session layer is the top of the [transport stack](crate::transport):
//! it logs in (`RetrieveServiceContent` + `Login`), logs in again once when
//! the server says the session is gone, and pauses logins after a refusal.
//! Retries and the breaker live below it. A login runs in a task of its
//! own that every call needing it awaits, and a logged-in call takes no
//! lock held across an await, so a call one caller leaves pending never
//! holds up another (see `Authenticator`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::backoff::Backoff;
use dvmm_core::config::{Secret, VcenterEndpoint};
use dvmm_core::ports::VsphereError;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerTransport};
use crate::options::SoapOptions;
use crate::soap::{Envelope, Node, Response};
use crate::tls::TlsPolicy;
use crate::transport::http::HttpTransport;
use crate::transport::retry::Retry;
use crate::transport::{BoxFuture, Call, Counted, Transport};
use crate::types::{MoRef, ServiceContent};

pub use crate::transport::http::SESSION_COOKIE;

/// Makes the bottom transport of a session's stack (the HTTP client, or a
/// scripted one in tests). Any `Fn(&str, &TlsPolicy, &SoapOptions) ->
/// Result<Arc<dyn Transport>, VsphereError>` is one.
pub trait Connector: Send + Sync {
    /// A transport to `url` under `tls`.
    ///
    /// # Errors
    /// Whatever keeps the transport from being built (e.g. a TLS setup
    /// error).
    fn connect(
        &self,
        url: &str,
        tls: &TlsPolicy,
        options: &SoapOptions,
    ) -> Result<Arc<dyn Transport>, VsphereError>;
}

impl<F> Connector for F
where
    F: Fn(&str, &TlsPolicy, &SoapOptions) -> Result<Arc<dyn Transport>, VsphereError> + Send + Sync,
{
    fn connect(
        &self,
        url: &str,
        tls: &TlsPolicy,
        options: &SoapOptions,
    ) -> Result<Arc<dyn Transport>, VsphereError> {
        self(url, tls, options)
    }
}

/// The default [`Connector`]: [`HttpTransport`] on reqwest.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpConnector;

impl Connector for HttpConnector {
    fn connect(
        &self,
        url: &str,
        tls: &TlsPolicy,
        options: &SoapOptions,
    ) -> Result<Arc<dyn Transport>, VsphereError> {
        Ok(Arc::new(HttpTransport::new(
            url,
            tls,
            options.max_answer_bytes,
        )?))
    }
}

/// Who a session is for. The password is part of it only as a SHA-256
/// fingerprint: two tenants that share a user but not a password get two
/// sessions, so one's wrong password never breaks the other.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    url: String,
    username: String,
    password: [u8; 32],
    tls: TlsPolicy,
}

impl SessionKey {
    pub(crate) fn of(endpoint: &VcenterEndpoint) -> Result<Self, VsphereError> {
        Ok(Self {
            url: endpoint.url.trim().to_owned(),
            username: endpoint.username.clone(),
            password: Sha256::digest(endpoint.password.expose().as_bytes()).into(),
            tls: TlsPolicy::from_endpoint(endpoint.insecure, endpoint.thumbprint.as_deref())?,
        })
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct LoggedIn {
    content: ServiceContent,
    generation: u64,
}

/// Refused logins of one key, and until when further logins are refused
/// without asking the server.
#[derive(Debug, Default)]
struct Refusals {
    count: u32,
    until: Option<Instant>,
}

/// Where the session's login stands.
enum LoginState {
    LoggedOut,
    /// A login runs in its own task; every caller awaits the same one.
    LoggingIn {
        id: u64,
        login: Login,
    },
    LoggedIn(Box<LoggedIn>),
}

/// A running login's outcome, once it has one.
type Login = tokio::sync::watch::Receiver<Option<Result<LoggedIn, VsphereError>>>;

/// Awaits a running login's outcome.
async fn outcome(mut login: Login) -> Result<LoggedIn, VsphereError> {
    match login.wait_for(Option::is_some).await {
        Ok(done) => done.clone().unwrap_or_else(|| {
            Err(VsphereError::Protocol {
                message: "a login ended without an outcome".into(),
            })
        }),
        // The task ended without an outcome: its runtime is shutting down.
        Err(_) => Err(VsphereError::Transport {
            message: "the login was stopped before it finished".into(),
        }),
    }
}

/// The session layer of the stack.
///
/// A call never waits on a lock another caller may hold across an await:
/// once logged in, a call reads the login under a plain mutex; a login runs
/// in a task of its own, which every caller that needs it awaits. A lock
/// held across the login instead let a caller that started a call and left
/// it unpolled (a `select!` running another branch's body, which made its
/// own call) stop every other call of the session, its own included.
struct Authenticator {
    core: Arc<AuthCore>,
}

/// What the login task needs, shared with it.
struct AuthCore {
    inner: Arc<dyn Transport>,
    username: String,
    password: Secret,
    state: Mutex<LoginState>,
    generation: AtomicU64,
    refusals: Mutex<Refusals>,
    login_backoff: Backoff,
    request_timeout: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("username", &self.core.username)
            .finish_non_exhaustive()
    }
}

/// Whether an answer says the session is gone: a `NotAuthenticated` fault,
/// or (vCenter's other form) a `RetrievePropertiesEx` answered with HTTP 200
/// whose `missingSet` holds one.
fn says_not_authenticated(method: &str, response: &Response) -> bool {
    match response {
        Response::Fault(f) => f.kind == "NotAuthenticated",
        Response::Ok(node) => {
            matches!(
                method,
                "RetrievePropertiesEx" | "ContinueRetrievePropertiesEx"
            ) && missing_not_authenticated(node)
        }
    }
}

impl AuthCore {
    fn call(&self, method: &'static str, body: String) -> Call {
        Call {
            method,
            body,
            deadline: self.request_timeout,
            idempotent: true,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LoginState> {
        // Plain data: a panic elsewhere leaves nothing half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses at once while a refused login's pause lasts.
    fn check_refusals(&self) -> Result<(), VsphereError> {
        let refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        match refusals.until {
            Some(until) if Instant::now() < until => {
                tracing::debug!(
                    user = %self.username,
                    refusals = refusals.count,
                    "not logging in: these credentials were refused moments ago"
                );
                Err(VsphereError::InvalidLogin {
                    username: self.username.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    fn record_login(&self, refused: bool) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if refused {
            refusals.count += 1;
            let pause = self.login_backoff.delay(refusals.count);
            refusals.until = Some(Instant::now() + pause);
            tracing::warn!(
                user = %self.username,
                ?pause,
                "vCenter refused the login; further logins with these credentials wait"
            );
        } else {
            *refusals = Refusals::default();
        }
    }

    /// `RetrieveServiceContent` and `Login`.
    async fn login(&self) -> Result<LoggedIn, VsphereError> {
        self.check_refusals()?;
        let mut env = Envelope::new("RetrieveServiceContent");
        env.moref("_this", "ServiceInstance", "ServiceInstance");
        let call = self.call("RetrieveServiceContent", env.finish());
        let content = match self.inner.round_trip(&call).await? {
            Response::Ok(node) => node
                .child("returnval")
                .and_then(ServiceContent::from_node)
                .ok_or_else(|| VsphereError::Protocol {
                    message: "RetrieveServiceContent returned no usable ServiceContent".into(),
                })?,
            Response::Fault(f) => return Err(f.into_error(&self.username)),
        };
        let mut env = Envelope::new("Login");
        env.moref(
            "_this",
            &content.session_manager.kind,
            &content.session_manager.value,
        )
        .text("userName", &self.username)
        .text("password", self.password.expose());
        let call = self.call("Login", env.finish());
        let span = tracing::debug_span!("soap_login", user = %self.username);
        let answer = self.inner.round_trip(&call).instrument(span).await;
        drop(call);
        match answer? {
            Response::Ok(_) => self.record_login(false),
            Response::Fault(f) => {
                let err = f.into_error(&self.username);
                if matches!(err, VsphereError::InvalidLogin { .. }) {
                    self.record_login(true);
                }
                return Err(err);
            }
        }
        let logged = LoggedIn {
            content,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        tracing::info!(user = %self.username, "logged in to vCenter");
        Ok(logged)
    }
}

/// Ids of login tasks, so a task records its outcome only while it is
/// still the session's login.
static LOGIN_IDS: AtomicU64 = AtomicU64::new(1);

impl Authenticator {
    /// Starts a login task, unless one runs already; the caller holds the
    /// state's lock.
    fn start_login(&self, state: &mut LoginState) -> Login {
        if let LoginState::LoggingIn { login, .. } = state {
            return login.clone();
        }
        let core = self.core.clone();
        let id = LOGIN_IDS.fetch_add(1, Ordering::Relaxed);
        let (done, login) = tokio::sync::watch::channel(None);
        tokio::spawn(
            async move {
                let result = core.login().await;
                {
                    let mut state = core.state();
                    // Recorded only while this is still the session's login
                    // (a logout meanwhile made it LoggedOut).
                    if matches!(&*state, LoginState::LoggingIn { id: running, .. } if *running == id)
                    {
                        *state = match &result {
                            Ok(logged) => LoginState::LoggedIn(Box::new(logged.clone())),
                            Err(_) => LoginState::LoggedOut,
                        };
                    }
                }
                done.send_replace(Some(result));
            }
            .in_current_span(),
        );
        *state = LoginState::LoggingIn {
            id,
            login: login.clone(),
        };
        login
    }

    async fn current(&self) -> Result<LoggedIn, VsphereError> {
        let login = {
            let mut state = self.core.state();
            match &*state {
                LoginState::LoggedIn(logged) => return Ok(LoggedIn::clone(logged)),
                _ => self.start_login(&mut state),
            }
        };
        outcome(login).await
    }

    /// Logs in again unless another caller already did since `generation`.
    async fn relogin(&self, generation: u64) -> Result<LoggedIn, VsphereError> {
        let login = {
            let mut state = self.core.state();
            match &*state {
                LoginState::LoggedIn(l) if l.generation != generation => {
                    return Ok(LoggedIn::clone(l));
                }
                LoginState::LoggingIn { login, .. } => login.clone(),
                _ => {
                    tracing::info!(user = %self.core.username, "vCenter session expired, logging in again");
                    *state = LoginState::LoggedOut;
                    self.start_login(&mut state)
                }
            }
        };
        outcome(login).await
    }

    async fn send(&self, call: &Call) -> Result<Response, VsphereError> {
        let logged = self.current().await?;
        let answer = self.core.inner.round_trip(call).await?;
        if !says_not_authenticated(call.method, &answer) {
            return Ok(answer);
        }
        // Exactly one re-login per call: a server that keeps refusing the
        // new session gets its NotAuthenticated passed up.
        self.relogin(logged.generation).await?;
        self.core.inner.round_trip(call).await
    }

    async fn logout(&self) -> Result<(), VsphereError> {
        // A login under way is let finish, so the session it opens is the
        // one logged out rather than left behind on the server.
        let pending = match &*self.core.state() {
            LoginState::LoggingIn { login, .. } => Some(login.clone()),
            _ => None,
        };
        if let Some(login) = pending {
            let _ = outcome(login).await;
        }
        let logged = {
            let mut state = self.core.state();
            match std::mem::replace(&mut *state, LoginState::LoggedOut) {
                LoginState::LoggedIn(logged) => *logged,
                other => {
                    *state = other;
                    return Ok(());
                }
            }
        };
        let mut env = Envelope::new("Logout");
        env.moref(
            "_this",
            &logged.content.session_manager.kind,
            &logged.content.session_manager.value,
        );
        let call = self.core.call("Logout", env.finish());
        match self.core.inner.round_trip(&call).await? {
            Response::Ok(_) => Ok(()),
            Response::Fault(f) if f.kind == "NotAuthenticated" => Ok(()),
            Response::Fault(f) => Err(f.into_error(&self.core.username)),
        }
    }
}

impl Transport for Authenticator {
    fn round_trip<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Response, VsphereError>> {
        Box::pin(self.send(call))
    }
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// One vCenter session: what [`crate::methods`] call through.
pub struct Session {
    id: u64,
    url: String,
    username: String,
    auth: Authenticator,
    options: Arc<SoapOptions>,
    events: Arc<crate::events::EventHub>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for `endpoint` whose calls go through `transport` (the
    /// stack below the session layer: retry, breaker, HTTP). Nothing is
    /// sent until the first call.
    pub fn over(
        transport: Arc<dyn Transport>,
        endpoint: &VcenterEndpoint,
        options: Arc<SoapOptions>,
    ) -> Self {
        Self {
            id: SESSION_IDS.fetch_add(1, Ordering::Relaxed),
            url: endpoint.url.trim().to_owned(),
            username: endpoint.username.clone(),
            auth: Authenticator {
                core: Arc::new(AuthCore {
                    inner: transport,
                    username: endpoint.username.clone(),
                    password: endpoint.password.clone(),
                    state: Mutex::new(LoginState::LoggedOut),
                    generation: AtomicU64::new(0),
                    refusals: Mutex::new(Refusals::default()),
                    login_backoff: options.login_backoff(),
                    request_timeout: options.request_timeout,
                }),
            },
            options,
            events: Arc::default(),
        }
    }

    /// The session's customization-event hub.
    pub fn events(&self) -> &Arc<crate::events::EventHub> {
        &self.events
    }

    /// A number that tells this session from every other in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many times this session has logged in. A new login may mean the
    /// server restarted and forgot what it knew (a vcsim restart, a vCenter
    /// restored from backup), so what was learned under an older login,
    /// such as resolved inventory, should be looked up again.
    pub fn logins(&self) -> u64 {
        self.auth.core.generation.load(Ordering::Relaxed)
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The options in force.
    pub fn options(&self) -> &SoapOptions {
        &self.options
    }

    /// The session's service content (logging in first if needed).
    ///
    /// # Errors
    /// Login failures.
    pub async fn content(&self) -> Result<ServiceContent, VsphereError> {
        Ok(self.auth.current().await?.content)
    }

    /// Calls `method` with the body the closure writes (it gets the
    /// service content to address managed objects). `idempotent` says the
    /// call is safe to repeat, which lets the retry layer retry it after a
    /// transport failure; `server_wait` is how long a long poll may wait on
    /// the server (zero for ordinary calls), which sets its deadline.
    ///
    /// # Errors
    /// The mapped fault or transport error.
    pub async fn call(
        &self,
        method: &'static str,
        idempotent: bool,
        server_wait: Duration,
        body: impl FnOnce(&ServiceContent, &mut Envelope),
    ) -> Result<Node, VsphereError> {
        let started = Instant::now();
        let span = tracing::debug_span!(
            "soap",
            method,
            duration_ms = tracing::field::Empty,
            fault = tracing::field::Empty
        );
        let result = async {
            let content = self.content().await?;
            let mut env = Envelope::new(method);
            body(&content, &mut env);
            let call = Call {
                method,
                body: env.finish(),
                deadline: self.options.deadline(server_wait),
                idempotent,
            };
            match self.auth.round_trip(&call).await? {
                // Still gone after the session layer's one re-login.
                answer @ Response::Ok(_) if says_not_authenticated(method, &answer) => {
                    Err(VsphereError::NotAuthenticated)
                }
                Response::Ok(node) => Ok(node),
                Response::Fault(f) => Err(f.into_error(&self.username)),
            }
        }
        .instrument(span.clone())
        .await;
        span.record("duration_ms", started.elapsed().as_millis() as u64);
        if let Err(e) = &result {
            span.record("fault", e.code());
        }
        result
    }

    /// Logs the session out (if logged in).
    ///
    /// # Errors
    /// Transport failures; a session the server already dropped is fine.
    pub async fn logout(&self) -> Result<(), VsphereError> {
        self.auth.logout().await
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

/// Sessions by key, and breakers by endpoint.
#[derive(Default)]
pub(crate) struct SessionPool {
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    breakers: Mutex<HashMap<(String, TlsPolicy), Arc<Breaker>>>,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool").finish_non_exhaustive()
    }
}

impl SessionPool {
    /// The breaker of an endpoint: shared by every session to it, since an
    /// endpoint that is down is down for every tenant.
    fn breaker(&self, key: &SessionKey, options: &SoapOptions) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        breakers
            .entry((key.url.clone(), key.tls.clone()))
            .or_insert_with(|| {
                Arc::new(Breaker::new(
                    options.breaker_threshold,
                    options.breaker_cooldown,
                    options.probe_deadline,
                ))
            })
            .clone()
    }

    pub(crate) fn get(
        &self,
        endpoint: &VcenterEndpoint,
        options: &Arc<SoapOptions>,
        requests: &Arc<AtomicU64>,
        connector: &dyn Connector,
    ) -> Result<Arc<Session>, VsphereError> {
        let key = SessionKey::of(endpoint)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get(&key) {
            return Ok(s.clone());
        }
        let bottom = connector.connect(&key.url, &key.tls, options)?;
        let counted: Arc<dyn Transport> = Arc::new(Counted::new(bottom, requests.clone()));
        let guarded: Arc<dyn Transport> = Arc::new(BreakerTransport::new(
            counted,
            self.breaker(&key, options),
            &key.url,
        ));
        let retried: Arc<dyn Transport> = Arc::new(Retry::new(
            guarded,
            options.max_retries,
            options.retry_backoff(),
        ));
        let session = Arc::new(Session::over(retried, endpoint, options.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::scripted::{ScriptedTransport, Step};

    fn assert_send<T: Send>(_: &T) {}

    fn scripted_session(script: &ScriptedTransport) -> Session {
        let endpoint = VcenterEndpoint {
            url: "https://vc.test/sdk".into(),
            username: "u".into(),
            password: Secret::new("p"),
            insecure: false,
            thumbprint: None,
            allow_plain_http: false,
        };
        Session::over(
            Arc::new(script.clone()),
            &endpoint,
            Arc::new(SoapOptions::default()),
        )
    }

    #[test]
    fn the_stack_and_its_calls_are_send() {
        let session = scripted_session(&ScriptedTransport::new());
        assert_send(&find(&session));
        assert_send(&session.content());
        assert_send(&session.logout());
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn find(session: &Session) -> impl std::future::Future<Output = Result<Node, VsphereError>> {
        session.call("FindByInventoryPath", true, Duration::ZERO, |sc, env| {
            this(env, &sc.search_index);
        })
    }

    /// A caller may start a call and then, before polling it again, await
    /// another call on the same session (a `select!` that runs one branch's
    /// body while another branch's call is pending). That must not stop
    /// the other call, nor any other caller: the pending call may be the
    /// one that started the login everyone waits for. It once did, through
    /// a lock the pending call held or was next in line for, and hung a
    /// customization wait for good (`CancelWaitForUpdates` sent while the
    /// guest poll it cancels waited for the session).
    #[tokio::test]
    async fn a_call_left_unpolled_holds_up_no_other_call() {
        let script = ScriptedTransport::new();
        script.push(
            "RetrieveServiceContent",
            Step::Answer(fixture("RetrieveServiceContent")).after(Duration::from_millis(20)),
        );
        script.fallback(|call| match call.method {
            "Login" => Step::ok("Login", "<returnval><key>k</key></returnval>"),
            other => Step::ok(other, ""),
        });
        let session = scripted_session(&script);
        // Polled once: it starts logging in, then is left alone.
        let mut left = Box::pin(find(&session));
        assert!(futures::poll!(left.as_mut()).is_pending());
        tokio::time::timeout(Duration::from_secs(5), find(&session))
            .await
            .expect("a second call is not held up by the first one left unpolled")
            .expect("the second call");
        // And the one left alone still completes when polled again.
        tokio::time::timeout(Duration::from_secs(5), left)
            .await
            .expect("the first call completes")
            .expect("the first call");
        let logins = script
            .requests()
            .iter()
            .filter(|r| r.method == "Login")
            .count();
        assert_eq!(logins, 1, "one login serves both calls");
    }

    #[test]
    fn session_keys_tell_passwords_apart_without_showing_them() {
        let a = VcenterEndpoint {
            url: "https://vc.test/sdk".into(),
            username: "u".into(),
            password: Secret::new("first-secret"),
            insecure: false,
            thumbprint: None,
            allow_plain_http: false,
        };
        let b = VcenterEndpoint {
            password: Secret::new("second-secret"),
            ..a.clone()
        };
        let (ka, kb) = (SessionKey::of(&a).unwrap(), SessionKey::of(&b).unwrap());
        assert_ne!(ka, kb);
        assert_eq!(ka, SessionKey::of(&a.clone()).unwrap());
        let shown = format!("{ka:?}");
        assert!(!shown.contains("first-secret"), "{shown}");
    }
}
