//! [`setup`]: from an admin URL to the four adapters a host needs, in one
//! call. It probes one connection first, so a wrong host, a refused port or
//! a bad password is reported as what it is, then migrates, ensures the
//! application login and connects as that login.

use std::fmt;
use std::time::Duration;

use dvmm_core::config::Secret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::error::{Error, Result, sqlstate};
use crate::{PgCheckpoints, PgEventStore, PgTimeline, PgWorkQueue, create_app_login, migrate};

/// Why a connection could not be opened, as [`Error::Unreachable`] reports
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// Nothing listens on that port (or a firewall rejected the connection).
    Refused,
    /// The host name does not resolve.
    UnknownHost,
    /// No answer within the probe's limit.
    TimedOut {
        /// The limit.
        after: Duration,
    },
    /// TLS could not be set up.
    Tls(String),
    /// Anything else the driver reported while connecting.
    Other(String),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Refused => f.write_str("connection refused"),
            ConnectFailure::UnknownHost => f.write_str("the host name does not resolve"),
            ConnectFailure::TimedOut { after } => write!(f, "no answer within {after:?}"),
            ConnectFailure::Tls(message) => write!(f, "TLS failed: {message}"),
            ConnectFailure::Other(message) => f.write_str(message),
        }
    }
}

/// What [`setup`] returns: the event store and the adapters that share its
/// pool (and the role check it passed).
#[derive(Debug, Clone)]
pub struct PgParts {
    /// The event store.
    pub store: PgEventStore,
    /// The timeline.
    pub timeline: PgTimeline,
    /// The runner's work queue, also the service's shared claims.
    pub work_queue: PgWorkQueue,
    /// The runner's feed checkpoints.
    pub checkpoints: PgCheckpoints,
    /// The request read model.
    pub requests: crate::PgRequests,
}

/// How [`setup_with`] connects; [`SetupOptions::default`] is what [`setup`]
/// uses.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Limit on the first connection, which tells an unreachable server
    /// apart from the rest. Default 10 s.
    pub probe_timeout: Duration,
    /// The application pool. Default: [`PgEventStore::default_pool_options`].
    pub pool: PgPoolOptions,
}

impl Default for SetupOptions {
    fn default() -> Self {
        Self {
            probe_timeout: Duration::from_secs(10),
            pool: PgEventStore::default_pool_options(),
        }
    }
}

/// Sets up dvmm on the database of `admin_url` and returns its adapters,
/// connected as the application login `login`:
///
/// 1. Probes one connection with the admin URL, so that a refused port, an
///    unknown host, a timeout, a failed password or a missing database is
///    reported as such ([`Error::Unreachable`], [`Error::AuthenticationFailed`],
///    [`Error::DatabaseMissing`]) instead of a pool timeout.
/// 2. Runs the migrations ([`migrate`]).
/// 3. Creates or updates `login` with `password` as a member of this
///    database's application role ([`create_app_login`]; the password never
///    leaves this process, only a SCRAM verifier does).
/// 4. Connects a pool as `login`, checks its role, and builds the store, the
///    timeline, the work queue and the checkpoints on it.
///
/// `admin_url` is an owner or superuser URL, e.g.
/// `postgres://postgres:secret@db/dvmm`; only step 4's pool is kept. Several
/// processes may run it at once.
///
/// ```no_run
/// # async fn demo() -> Result<(), dvmm_store_postgres::Error> {
/// use dvmm_core::config::Secret;
///
/// let parts = dvmm_store_postgres::setup(
///     "postgres://postgres:admin-secret@localhost/dvmm",
///     "dvmm_portal",
///     &Secret::new("app-secret"),
/// )
/// .await?;
/// let (store, timeline) = (parts.store, parts.timeline);
/// # let _ = (store, timeline);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`Error::InvalidUrl`] for a URL that does not parse (the URL is not
/// repeated: it may hold a password); the probe's errors above; then those
/// of [`migrate`], [`create_app_login`] and [`PgEventStore::new`].
pub async fn setup(admin_url: &str, login: &str, password: &Secret) -> Result<PgParts> {
    let admin: PgConnectOptions = admin_url.parse().map_err(|_| Error::InvalidUrl {
        reason: "not a postgres:// URL the driver understands",
    })?;
    setup_with(admin, login, password, SetupOptions::default()).await
}

/// [`setup`] with connect options instead of a URL, and explicit
/// [`SetupOptions`].
///
/// # Errors
/// As [`setup`].
pub async fn setup_with(
    admin: PgConnectOptions,
    login: &str,
    password: &Secret,
    options: SetupOptions,
) -> Result<PgParts> {
    probe(&admin, options.probe_timeout).await?;
    let admin_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.probe_timeout)
        .connect_with(admin.clone())
        .await
        .map_err(|source| Error::Connect { source })?;
    let prepared = prepare(&admin_pool, login, password).await;
    admin_pool.close().await;
    prepared?;
    let app = admin.username(login).password(password.expose());
    let store = PgEventStore::connect_with(options.pool, app).await?;
    Ok(PgParts {
        timeline: store.timeline(),
        work_queue: store.work_queue(),
        checkpoints: store.checkpoints(),
        requests: store.requests(),
        store,
    })
}

async fn prepare(admin: &PgPool, login: &str, password: &Secret) -> Result<()> {
    migrate(admin).await?;
    // Processes that start together update the same role rows; PostgreSQL
    // reports the loser as "tuple concurrently updated" (XX000) or a
    // unique violation on the role's name. Both succeed on a second try.
    let mut attempt = 0u32;
    loop {
        match create_app_login(admin, login, password).await {
            Ok(()) => return Ok(()),
            Err(Error::Database { source, operation })
                if attempt < 5
                    && matches!(
                        sqlstate(&source).as_deref(),
                        Some("XX000" | "23505" | "40001" | "40P01")
                    ) =>
            {
                attempt += 1;
                tracing::debug!(operation, attempt, "role update collided; trying again");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(other) => return Err(other),
        }
    }
}

/// Opens and closes one connection, classifying what went wrong.
async fn probe(options: &PgConnectOptions, limit: Duration) -> Result<()> {
    let host = options.get_host().to_owned();
    let port = options.get_port();
    let unreachable = |reason| Error::Unreachable {
        host: host.clone(),
        port,
        reason,
    };
    let connection = match tokio::time::timeout(limit, options.connect()).await {
        Err(_) => return Err(unreachable(ConnectFailure::TimedOut { after: limit })),
        Ok(result) => result,
    };
    match connection {
        Ok(connection) => {
            // Closing politely is not part of the verdict.
            let _ = connection.close().await;
            Ok(())
        }
        Err(error) => Err(classify(error, options, unreachable)),
    }
}

fn classify(
    error: sqlx::Error,
    options: &PgConnectOptions,
    unreachable: impl Fn(ConnectFailure) -> Error,
) -> Error {
    match sqlstate(&error).as_deref() {
        // invalid_password, invalid_authorization_specification
        Some("28P01" | "28000") => {
            return Error::AuthenticationFailed {
                user: options.get_username().to_owned(),
            };
        }
        Some("3D000") => {
            return Error::DatabaseMissing {
                database: options.get_database().unwrap_or_default().to_owned(),
            };
        }
        _ => {}
    }
    match &error {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            unreachable(ConnectFailure::Refused)
        }
        sqlx::Error::Io(io) if is_resolution_failure(io) => {
            unreachable(ConnectFailure::UnknownHost)
        }
        sqlx::Error::Tls(tls) => unreachable(ConnectFailure::Tls(tls.to_string())),
        sqlx::Error::Io(io) => unreachable(ConnectFailure::Other(io.to_string())),
        _ => Error::Connect { source: error },
    }
}

/// The resolver's failures carry no dedicated `ErrorKind`; their messages
/// come from getaddrinfo.
fn is_resolution_failure(io: &std::io::Error) -> bool {
    let message = io.to_string();
    message.contains("lookup address")
        || message.contains("Name or service not known")
        || message.contains("No address associated")
        || message.contains("nodename nor servname")
        || message.contains("Temporary failure in name resolution")
}
