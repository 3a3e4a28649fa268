//! Shared set-up for the PostgreSQL tests and benchmarks: one fresh database
//! (migrated by the admin connection) and one fresh application login role
//! per test, so tests run in parallel without seeing each other's rows.
//!
//! Without `DATABASE_URL` a test prints why and skips, unless
//! `DVMM_REQUIRE_SERVICES=1`, in which case it fails. A skip is also appended
//! as one line `<test>: <why>` to the file named by `DVMM_SKIP_LOG`, so that a
//! skipped test does not pass unnoticed in a summary.

#![allow(dead_code)]

use std::io::Write;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use dvmm_core::config::Secret;
use dvmm_core::event::{EventMetadata, NewEvent};
use dvmm_core::ids::{CorrelationId, EventId, TenantId, UserId};
use dvmm_store_postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use dvmm_store_postgres::sqlx::{self, PgPool};
use dvmm_store_postgres::{PgEventStore, create_app_login, migrate};
use uuid::Uuid;

/// A database of its own for one test.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// The application's login role.
    pub app_role: String,
    /// Superuser (table owner) connection to the test database.
    pub admin: PgPool,
    /// Connection options of the application role to the test database.
    pub app_options: PgConnectOptions,
    /// The application role's password.
    pub app_password: String,
    /// The server's connection options (superuser, maintenance database).
    pub server: PgConnectOptions,
    /// Further roles a test made, dropped with the database.
    extra_roles: Mutex<Vec<String>>,
}

/// Whether `DVMM_REQUIRE_SERVICES=1` asks for a missing service to fail the test.
pub fn services_required() -> bool {
    std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// Reports a skipped test: prints why, and appends `<test>: <why>` to the
/// file named by `DVMM_SKIP_LOG` when it is set (errors writing it are
/// ignored: the skip itself was already printed).
pub fn skip(test: &str, why: &str) {
    eprintln!("skipping {test}: {why}");
    let Some(path) = std::env::var_os("DVMM_SKIP_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{test}: {why}");
    }
}

/// `DATABASE_URL`, or `None` after reporting why the test is skipped.
pub fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if services_required() {
                panic!(
                    "{test}: DATABASE_URL is not set but DVMM_REQUIRE_SERVICES=1 requires PostgreSQL \
                     (start one with: eval \"$(scripts/pg-throwaway.sh start)\")"
                );
            }
            skip(
                test,
                "DATABASE_URL is not set (start a server with: eval \"$(scripts/pg-throwaway.sh start)\")",
            );
            None
        }
    }
}

fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl TestDb {
    /// Creates and migrates a database for `test`; `None` when skipped.
    pub async fn create(test: &str) -> Option<Self> {
        let url = database_url(test)?;
        Some(Self::create_on(&url).await)
    }

    /// Creates and migrates a database on the server of `url` (a superuser).
    pub async fn create_on(url: &str) -> Self {
        let server = PgConnectOptions::from_str(url).expect("DATABASE_URL is a valid URL");
        let name = format!("dvmm_t_{}", short_id());
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(server.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&maintenance)
            .await
            .expect("create the test database");
        maintenance.close().await;

        let admin = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(server.clone().database(&name))
            .await
            .expect("connect to the test database");
        migrate(&admin).await.expect("migrate");

        let app_role = format!("dvmm_t_app_{}", short_id());
        let password = Uuid::new_v4().simple().to_string();
        create_app_login(&admin, &app_role, &Secret::new(password.clone()))
            .await
            .expect("create the application role");
        let app_options = server
            .clone()
            .database(&name)
            .username(&app_role)
            .password(&password);
        Self {
            name,
            app_role,
            admin,
            app_options,
            app_password: password,
            server,
            extra_roles: Mutex::new(Vec::new()),
        }
    }

    /// Connection options of `role` with `password` to the test database.
    pub fn options_for(&self, role: &str, password: &str) -> PgConnectOptions {
        self.server
            .clone()
            .database(&self.name)
            .username(role)
            .password(password)
    }

    /// Makes another application login (through `create_app_login`), then
    /// gives it `attributes` (e.g. `BYPASSRLS`) as the superuser; returns its
    /// connection options. The role is dropped with the database.
    pub async fn extra_login(&self, attributes: &str) -> (String, PgConnectOptions) {
        let role = format!("dvmm_t_x_{}", short_id());
        let password = Uuid::new_v4().simple().to_string();
        self.extra_roles.lock().expect("roles").push(role.clone());
        create_app_login(&self.admin, &role, &Secret::new(password.clone()))
            .await
            .expect("create the extra login");
        if !attributes.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER ROLE {role} {attributes}"
            )))
            .execute(&self.admin)
            .await
            .expect("give the extra login its attributes");
        }
        let options = self.options_for(&role, &password);
        (role, options)
    }

    /// Remembers a role the test made itself, so that `drop` removes it.
    pub fn forget_role_later(&self, role: &str) {
        self.extra_roles
            .lock()
            .expect("roles")
            .push(role.to_owned());
    }

    /// A pool of the application role.
    pub async fn app_pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.app_options.clone())
            .await
            .expect("connect as the application role")
    }

    /// Another superuser pool on the test database.
    pub async fn admin_pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(self.server.clone().database(&self.name))
            .await
            .expect("connect to the test database")
    }

    /// A store on a pool of the application role, checked by `connect_with`.
    pub async fn store(&self, max_connections: u32) -> PgEventStore {
        PgEventStore::connect_with(
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(30)),
            self.app_options.clone(),
        )
        .await
        .expect("connect the store as the application role")
    }

    /// Drops the database and the login role. Tests call it at the end; a
    /// failed test leaves its database behind for inspection.
    pub async fn drop(self) {
        let group = dvmm_store_postgres::app_role(&self.admin)
            .await
            .expect("the database's application role");
        self.admin.close().await;
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.server.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&maintenance)
        .await
        .expect("drop the test database");
        let extra = std::mem::take(&mut *self.extra_roles.lock().expect("roles"));
        // The group role last: it is a cluster object that outlives the
        // database, and the logins are its members.
        let roles = std::iter::once(self.app_role.clone())
            .chain(extra)
            .chain([group]);
        for role in roles {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
                .execute(&maintenance)
                .await
                .expect("drop a test role");
        }
        maintenance.close().await;
    }
}

/// An event of `tenant` with `payload`.
pub fn event(tenant: TenantId, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        event_type: "TestEvent".into(),
        schema_version: 1,
        payload,
        metadata: EventMetadata {
            event_id: EventId::from_uuid(Uuid::new_v4()),
            tenant_id: tenant,
            user_id: UserId::from_uuid(Uuid::new_v4()),
            correlation_id: CorrelationId::from_uuid(Uuid::new_v4()),
            causation_id: None,
            occurred_at: chrono::Utc::now(),
        },
    }
}

/// A fresh tenant.
pub fn tenant() -> TenantId {
    TenantId::from_uuid(Uuid::new_v4())
}

/// Awaits `future`, failing the test with a message naming `what` it waited
/// for when it takes longer than `limit`: a hang becomes a failure.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}
