#![doc = include_str!("../README.md")]

mod error;
mod event_store;
mod queue;
mod requests;
mod schema;
mod scram;
mod setup;
mod tenant;
mod timeline;

pub use dvmm_core::ports::QueueCounts;
pub use error::{Error, Result};
pub use event_store::PgEventStore;
pub use queue::{PgCheckpoints, PgWorkQueue};
pub use requests::PgRequests;
pub use schema::{APP_ROLE, MIGRATOR, app_role, create_app_login, migrate, verify_app_role};
pub use scram::{
    SCRAM_ITERATIONS, SCRAM_SALT_LEN, scram_sha256_verifier, scram_sha256_verifier_with,
};
pub use setup::{ConnectFailure, PgParts, SetupOptions, setup, setup_with};
pub use timeline::PgTimeline;

/// The driver, re-exported so hosts build pools and options with the same
/// sqlx version as the store.
pub use sqlx;
