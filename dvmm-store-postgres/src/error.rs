//! The crate's setup error and the mapping of database errors onto the
//! port's [`StoreError`].

use dvmm_core::ports::StoreError;

/// Setting up the store failed (connecting, migrating, creating roles).
///
/// Errors of the ports themselves are [`StoreError`]s.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or refused the login.
    #[error("failed to connect to PostgreSQL: {source}")]
    Connect {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The admin URL given to [`crate::setup`] does not parse. The URL is
    /// not repeated: it may hold a password.
    #[error("invalid PostgreSQL URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No connection could be opened to the server.
    #[error("cannot reach PostgreSQL at {host}:{port}: {reason}")]
    Unreachable {
        /// The host (or socket directory) connected to.
        host: String,
        /// The port.
        port: u16,
        /// Why.
        reason: crate::ConnectFailure,
    },
    /// The server refused the user's password (or the user does not exist,
    /// or `pg_hba.conf` has no entry for it).
    #[error("PostgreSQL refused the login of user {user:?}: check the user name and password")]
    AuthenticationFailed {
        /// The user that was refused.
        user: String,
    },
    /// The server has no database of that name.
    #[error("PostgreSQL has no database {database:?}: create it first (CREATE DATABASE)")]
    DatabaseMissing {
        /// The missing database.
        database: String,
    },
    /// A migration failed.
    #[error("failed to apply the dvmm migrations: {source}")]
    Migrate {
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The dvmm tables do not exist in the connection's schema.
    #[error(
        "the dvmm tables are missing in this database: run dvmm_store_postgres::migrate with an admin connection first"
    )]
    NotMigrated,
    /// The connection's role would not be held back by row-level security.
    #[error(
        "role {role:?} {reason}; connect as a login role made by create_app_login for this database instead \
         (dvmm_store_postgres::setup does both from this URL)"
    )]
    UnsafeRole {
        /// The role the connection uses.
        role: String,
        /// Why it is unsafe.
        reason: &'static str,
    },
    /// The connection's role is not a member of this database's application
    /// role: typically a login made for another database of the cluster.
    #[error(
        "role {role:?} is not a member of {app_role:?}, the application role of this database; \
         make the login with create_app_login on this database"
    )]
    NotAppRole {
        /// The role the connection uses.
        role: String,
        /// This database's application role.
        app_role: String,
    },
    /// An empty password, which PostgreSQL would not accept as one.
    #[error("the application login needs a non-empty password")]
    EmptyPassword,
    /// A role name that is not a plain lowercase SQL identifier.
    #[error(
        "invalid role name {name:?}: use 1-63 characters of a-z, 0-9 and _, not starting with a digit"
    )]
    InvalidRoleName {
        /// The refused name.
        name: String,
    },
    /// A setup statement failed.
    #[error("failed to {operation}: {source}")]
    Database {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

/// `pub type Result<T> = Result<T, Error>` for setup calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SQLSTATE of `unique_violation`.
pub(crate) const UNIQUE_VIOLATION: &str = "23505";

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether trying again (on a fresh connection) may succeed.
pub(crate) fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources (too many
            // connections, out of memory); 57P01/57P02/57P03: server shutting
            // down, crashed or not yet accepting connections; 57P05: the
            // session was closed for idling; 40001/40P01: serialization
            // failure and deadlock. Not 57P04: the database was dropped, and
            // asking again cannot bring it back.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "57P05")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// Maps a driver error to [`StoreError::Backend`].
pub(crate) fn backend(operation: &'static str, error: sqlx::Error) -> StoreError {
    let retryable = is_retryable(&error);
    StoreError::Backend {
        operation,
        message: error.to_string(),
        retryable,
        source: Some(Box::new(error)),
    }
}

/// A stored row that cannot be turned back into a port type: the data (or
/// the schema) is broken, so retrying cannot help.
pub(crate) fn corrupt(operation: &'static str, message: String) -> StoreError {
    StoreError::Backend {
        operation,
        message,
        retryable: false,
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_pool_timeouts_are_retryable_configuration_is_not() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(is_retryable(&io));
        assert!(is_retryable(&sqlx::Error::PoolTimedOut));
        assert!(!is_retryable(&sqlx::Error::PoolClosed));
        assert!(!is_retryable(&sqlx::Error::RowNotFound));
        let e = backend("append", sqlx::Error::PoolTimedOut);
        assert!(e.is_retryable());
        assert!(e.to_string().contains("append"), "{e}");
    }

    /// A server error with only a SQLSTATE, as the driver reports one.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "server error {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "server error"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn with_code(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    /// The SQLSTATEs after which the same call may succeed on a fresh
    /// connection, and a sample of those after which it cannot.
    #[test]
    fn which_sqlstates_are_retryable() {
        let retryable = [
            ("08000", "connection exception"),
            ("08003", "connection does not exist"),
            ("08006", "connection failure"),
            ("08001", "client unable to establish connection"),
            ("08004", "server rejected the connection"),
            ("53000", "insufficient resources"),
            ("53100", "disk full"),
            ("53200", "out of memory"),
            ("53300", "too many connections"),
            ("57P01", "admin shutdown"),
            ("57P02", "crash shutdown"),
            ("57P03", "cannot connect now (starting up)"),
            ("57P05", "idle session timeout"),
            ("40001", "serialization failure"),
            ("40P01", "deadlock detected"),
        ];
        for (code, what) in retryable {
            assert!(
                is_retryable(&with_code(code)),
                "{code} ({what}) is retryable"
            );
            let e = backend("append", with_code(code));
            assert!(
                e.is_retryable(),
                "{code} ({what}) maps to a retryable StoreError"
            );
        }
        let permanent = [
            ("23505", "unique violation"),
            ("23514", "check violation"),
            ("22P02", "invalid text representation"),
            ("22021", "invalid byte sequence (NUL)"),
            ("42501", "insufficient privilege (row-level security)"),
            ("42P01", "undefined table (not migrated)"),
            ("42883", "undefined function (an older schema)"),
            ("28P01", "invalid password"),
            (
                "0A000",
                "feature not supported (read_all outside READ COMMITTED)",
            ),
            ("57014", "query canceled (statement timeout)"),
            ("57P04", "database dropped"),
            ("40002", "integrity constraint violation at commit"),
            ("XX000", "internal error"),
        ];
        for (code, what) in permanent {
            assert!(
                !is_retryable(&with_code(code)),
                "{code} ({what}) is not retryable"
            );
            assert!(
                !backend("load", with_code(code)).is_retryable(),
                "{code} ({what})"
            );
        }
        assert_eq!(
            sqlstate(&with_code("23505")).as_deref(),
            Some(UNIQUE_VIOLATION)
        );
        assert_eq!(sqlstate(&sqlx::Error::PoolTimedOut), None);
    }

    #[test]
    fn corrupt_rows_are_not_retryable() {
        let e = corrupt("load", "bad metadata".into());
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("bad metadata"));
    }
}
