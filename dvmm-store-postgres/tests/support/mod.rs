//! Shared set-up for the PostgreSQL tests and benchmarks: one fresh database
//! (migrated by the admin connection) and one fresh application login role
//! per test, so tests run in parallel without seeing each other's rows.
//!
//! Without `DATABASE_URL` a test prints why and skips, unless
//! `DVMM_REQUIRE_SERVICES=1`, in which case it fails.

#![allow(dead_code)]

use std::str::FromStr;
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
    server: PgConnectOptions,
}

/// `DATABASE_URL`, or `None` after printing why the test is skipped.
pub fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("DVMM_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!(
                    "{test}: DATABASE_URL is not set but DVMM_REQUIRE_SERVICES=1 requires PostgreSQL \
                     (start one with: eval \"$(scripts/pg-throwaway.sh start)\")"
                );
            }
            eprintln!(
                "skipping {test}: DATABASE_URL is not set \
                 (start a server with: eval \"$(scripts/pg-throwaway.sh start)\")"
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
        let server = PgConnectOptions::from_str(&url).expect("DATABASE_URL is a valid URL");
        let name = format!("dvmm_t_{}", short_id());
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(server.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
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
        Some(Self {
            name,
            app_role,
            admin,
            app_options,
            app_password: password,
            server,
        })
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
        self.admin.close().await;
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.server.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&maintenance)
        .await
        .expect("drop the test database");
        sqlx::query(&format!("DROP ROLE IF EXISTS {}", self.app_role))
            .execute(&maintenance)
            .await
            .expect("drop the test role");
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
