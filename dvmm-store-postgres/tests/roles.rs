//! `create_app_login` on a real server (`DATABASE_URL`): the login it makes
//! authenticates with SCRAM, running it again only changes the password, the
//! password never travels to the server (so no error can carry it), and a
//! role that escapes the policies is refused instead of being changed.

mod support;

use std::error::Error as _;

use dvmm_core::config::Secret;
use dvmm_store_postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use dvmm_store_postgres::sqlx::{self, PgPool};
use dvmm_store_postgres::{Error, PgEventStore, create_app_login, scram_sha256_verifier_with};
use support::TestDb;
use uuid::Uuid;

fn password() -> String {
    format!("pw-{}", Uuid::new_v4().simple())
}

async fn connect(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// Everything an error shows: Display and Debug of it and of each source.
fn everything_shown(err: &Error) -> String {
    let mut shown = format!("{err}\n{err:?}");
    let mut source = err.source();
    while let Some(s) = source {
        shown.push_str(&format!("\n{s}\n{s:?}"));
        source = s.source();
    }
    shown
}

async fn rolpassword(db: &TestDb, role: &str) -> String {
    sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
        .bind(role)
        .fetch_one(&db.admin)
        .await
        .expect("read the stored verifier")
}

#[tokio::test]
async fn the_login_authenticates_with_the_scram_verifier_computed_here() {
    let Some(db) =
        TestDb::create("the_login_authenticates_with_the_scram_verifier_computed_here").await
    else {
        return;
    };
    // TestDb made the login with create_app_login: it logs in (the throwaway
    // cluster asks for scram-sha-256) and passes the store's check.
    PgEventStore::connect_with(
        PgPoolOptions::new().max_connections(1),
        db.app_options.clone(),
    )
    .await
    .expect("the login made by create_app_login connects and passes the check");
    let stored = rolpassword(&db, &db.app_role).await;
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    assert!(!stored.contains(&db.app_password));

    // Same salt, same verifier as the server's own: let the server compute
    // one from a cleartext password (this test's superuser may), then compute
    // it here with its salt.
    let (role, _) = db.extra_login("").await;
    let secret = "Grüße-Ⅸ-ﬁ ✓";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {role} PASSWORD '{secret}'"
    )))
    .execute(&db.admin)
    .await
    .expect("set a password on the server");
    let servers = rolpassword(&db, &role).await;
    let salt = servers
        .strip_prefix("SCRAM-SHA-256$4096:")
        .and_then(|rest| rest.split('$').next())
        .expect("the server's verifier has the expected format");
    use base64::Engine as _;
    let salt = base64::engine::general_purpose::STANDARD
        .decode(salt)
        .expect("the salt is Base64");
    assert_eq!(
        scram_sha256_verifier_with(&Secret::new(secret), &salt, 4096),
        servers,
        "the verifier computed here equals PostgreSQL's"
    );
    db.drop().await;
}

#[tokio::test]
async fn running_create_app_login_again_changes_only_the_password() {
    let Some(db) = TestDb::create("running_create_app_login_again_changes_only_the_password").await
    else {
        return;
    };
    let (first, second) = (password(), password());
    let role = "dvmm_t_again_".to_owned() + &Uuid::new_v4().simple().to_string()[..8];
    db.forget_role_later(&role);
    create_app_login(&db.admin, &role, &Secret::new(first.clone()))
        .await
        .expect("first run");
    create_app_login(&db.admin, &role, &Secret::new(second.clone()))
        .await
        .expect("the second run succeeds too");

    let pool = connect(db.options_for(&role, &second))
        .await
        .expect("the latest password logs in");
    PgEventStore::new(pool)
        .await
        .expect("and the login is still a member of the database's role");
    let err = connect(db.options_for(&role, &first))
        .await
        .expect_err("the earlier password no longer does");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    let memberships: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
          WHERE r.rolname = $1",
    )
    .bind(&role)
    .fetch_one(&db.admin)
    .await
    .expect("count memberships");
    assert_eq!(memberships, 1, "one membership, granted once");
    db.drop().await;
}

#[tokio::test]
async fn no_error_of_create_app_login_contains_the_password() {
    let Some(db) = TestDb::create("no_error_of_create_app_login_contains_the_password").await
    else {
        return;
    };
    let secret = password();
    let pw = Secret::new(secret.clone());

    // The server refuses: the application login may not create roles.
    let app = db.app_pool(1).await;
    let err = create_app_login(&app, "dvmm_t_refused", &pw)
        .await
        .expect_err("the application login cannot create roles");
    assert!(matches!(err, Error::Database { .. }), "{err:?}");
    let shown = everything_shown(&err);
    assert!(shown.contains("permission denied"), "{shown}");
    assert!(
        !shown.contains(&secret),
        "the password is in the error: {shown}"
    );

    // A role name that is not a plain identifier.
    let err = create_app_login(&db.admin, "Bad-Name", &pw)
        .await
        .expect_err("invalid name");
    assert!(matches!(err, Error::InvalidRoleName { .. }), "{err:?}");
    assert!(!everything_shown(&err).contains(&secret));

    // An existing superuser (or BYPASSRLS) role is refused and left as it was.
    for attributes in ["SUPERUSER", "BYPASSRLS"] {
        let (role, options) = db.extra_login(attributes).await;
        let err = create_app_login(&db.admin, &role, &pw)
            .await
            .expect_err("an unsafe role is refused");
        assert!(
            matches!(err, Error::UnsafeRole { .. }),
            "{attributes}: {err:?}"
        );
        assert!(!everything_shown(&err).contains(&secret));
        connect(options)
            .await
            .unwrap_or_else(|e| panic!("{attributes}: the role's own password still works: {e}"));
    }
    // A group role with members: granting it the application role would let
    // every member in.
    let group = format!("dvmm_t_group_{}", &Uuid::new_v4().simple().to_string()[..8]);
    db.forget_role_later(&group);
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {group} NOLOGIN")))
        .execute(&db.admin)
        .await
        .expect("create a group");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT {group} TO {}",
        db.app_role
    )))
    .execute(&db.admin)
    .await
    .expect("give it a member");
    let err = create_app_login(&db.admin, &group, &pw)
        .await
        .expect_err("a group with members is refused");
    assert!(
        matches!(&err, Error::UnsafeRole { reason, .. } if reason.contains("members")),
        "{err:?}"
    );
    let can_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&group)
        .fetch_one(&db.admin)
        .await
        .expect("read the group");
    assert!(!can_login, "the group was left as it was");

    let err = create_app_login(&db.admin, "dvmm_t_empty", &Secret::new(""))
        .await
        .expect_err("empty password");
    assert!(matches!(err, Error::EmptyPassword), "{err:?}");

    // Nor did the password reach the server's log (when the test can read the
    // log of a cluster from scripts/pg-throwaway.sh).
    if let Ok(datadir) = std::env::var("DVMM_PG_DATADIR") {
        let log = std::path::Path::new(&datadir).with_file_name("server.log");
        if let Ok(text) = std::fs::read_to_string(&log) {
            assert!(
                text.contains("permission denied to create role"),
                "the refusal above is logged in {}",
                log.display()
            );
            assert!(
                !text.contains(&secret),
                "the password is in {}",
                log.display()
            );
        }
    }
    db.drop().await;
}
