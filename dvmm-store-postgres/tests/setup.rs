//! `setup`: one call from an admin URL to working adapters, and connection
//! failures reported as what they are (refused, unknown host, no answer,
//! wrong password, missing database) instead of a pool timeout. The failures
//! that need no server run always; the rest need `DATABASE_URL`.

mod support;

use std::time::{Duration, Instant};

use dvmm_core::config::Secret;
use dvmm_core::ids::VmRequestId;
use dvmm_core::ports::{EventStore, RequestClaims};
use dvmm_store_postgres::sqlx::postgres::PgConnectOptions;
use dvmm_store_postgres::{ConnectFailure, Error, SetupOptions, setup, setup_with};
use support::{TestDb, event, tenant, within};
use uuid::Uuid;

const PASSWORD: &str = "Setup-Secret-7Hq";

fn options(probe: Duration) -> SetupOptions {
    SetupOptions {
        probe_timeout: probe,
        ..SetupOptions::default()
    }
}

fn shown(error: &Error) -> String {
    format!("{error} {error:?}")
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_refused_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://admin:{PASSWORD}@127.0.0.1:{port}/dvmm");
    let started = Instant::now();
    let err = within(
        Duration::from_secs(30),
        "setup against a closed port",
        setup(&url, "dvmm_app_login", &Secret::new(PASSWORD)),
    )
    .await
    .expect_err("nothing listens there");
    match &err {
        Error::Unreachable {
            host,
            port: p,
            reason,
        } => {
            assert_eq!(host, "127.0.0.1");
            assert_eq!(*p, port);
            assert_eq!(*reason, ConnectFailure::Refused);
        }
        other => panic!("expected Unreachable/Refused, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refusal is reported at once, not after a pool timeout ({:?})",
        started.elapsed()
    );
    assert!(!shown(&err).contains(PASSWORD), "{}", shown(&err));
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_timeout_of_the_probe() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let admin = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("admin")
        .password(PASSWORD)
        .database("dvmm");
    let err = within(
        Duration::from_secs(30),
        "setup against a silent server",
        setup_with(
            admin,
            "dvmm_app_login",
            &Secret::new(PASSWORD),
            options(Duration::from_secs(1)),
        ),
    )
    .await
    .expect_err("a silent server");
    assert!(
        matches!(
            &err,
            Error::Unreachable { reason: ConnectFailure::TimedOut { after }, .. }
                if *after == Duration::from_secs(1)
        ),
        "{err:?}"
    );
    silent.abort();
}

#[tokio::test]
async fn a_host_that_does_not_resolve_is_named_as_such() {
    let url = format!("postgres://admin:{PASSWORD}@dvmm-no-such-host.invalid:5432/dvmm");
    let err = within(
        Duration::from_secs(60),
        "setup against an unknown host",
        setup_with(
            url.parse().unwrap(),
            "dvmm_app_login",
            &Secret::new(PASSWORD),
            options(Duration::from_secs(20)),
        ),
    )
    .await
    .expect_err("the name does not resolve");
    assert!(
        matches!(
            &err,
            Error::Unreachable { reason: ConnectFailure::UnknownHost, host, .. }
                if host == "dvmm-no-such-host.invalid"
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_url_that_does_not_parse_is_not_repeated() {
    let err = setup(
        &format!("postgres://admin:{PASSWORD}@host:notaport/db"),
        "dvmm_app_login",
        &Secret::new(PASSWORD),
    )
    .await
    .expect_err("a bad port");
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    assert!(!shown(&err).contains(PASSWORD), "{}", shown(&err));
}

#[tokio::test]
async fn setup_migrates_makes_the_login_and_returns_working_adapters() {
    let Some(db) =
        TestDb::create("setup_migrates_makes_the_login_and_returns_working_adapters").await
    else {
        return;
    };
    // A database that was never migrated, reached with the admin URL a
    // newcomer has at hand.
    let fresh = format!("dvmm_t_setup_{}", &Uuid::new_v4().simple().to_string()[..8]);
    dvmm_store_postgres::sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {fresh}")))
        .execute(&db.admin)
        .await
        .expect("create a fresh database");
    let admin = db.server.clone().database(&fresh);
    let login = format!("dvmm_t_login_{}", &Uuid::new_v4().simple().to_string()[..8]);
    db.forget_role_later(&login);

    // Wrong admin password, then a database that does not exist: each is
    // named, and neither error shows a password.
    let wrong = admin.clone().password("not-the-password");
    let err = within(
        Duration::from_secs(30),
        "setup with a wrong password",
        setup_with(
            wrong,
            &login,
            &Secret::new(PASSWORD),
            options(Duration::from_secs(10)),
        ),
    )
    .await
    .expect_err("wrong password");
    assert!(matches!(err, Error::AuthenticationFailed { .. }), "{err:?}");
    assert!(!shown(&err).contains("not-the-password"));
    let missing = admin.clone().database("dvmm_t_no_such_db");
    let err = within(
        Duration::from_secs(30),
        "setup on a missing database",
        setup_with(
            missing,
            &login,
            &Secret::new(PASSWORD),
            options(Duration::from_secs(10)),
        ),
    )
    .await
    .expect_err("missing database");
    assert!(
        matches!(&err, Error::DatabaseMissing { database } if database == "dvmm_t_no_such_db"),
        "{err:?}"
    );

    // Two processes setting up at once both get working adapters.
    let (a, b) = within(
        Duration::from_secs(120),
        "two setups at once",
        futures::future::join(
            setup_with(
                admin.clone(),
                &login,
                &Secret::new(PASSWORD),
                options(Duration::from_secs(10)),
            ),
            setup_with(
                admin.clone(),
                &login,
                &Secret::new(PASSWORD),
                options(Duration::from_secs(10)),
            ),
        ),
    )
    .await;
    let parts = a.expect("first setup");
    let other = b.expect("second setup");

    // The pool is the login's, held to the tenant policies.
    let user: String = dvmm_store_postgres::sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(parts.store.pool())
        .await
        .unwrap();
    assert_eq!(user, login);
    dvmm_store_postgres::verify_app_role(parts.store.pool())
        .await
        .expect("the login is held to the policies");

    // Store, timeline-sharing pool and queue all work on it.
    let t = tenant();
    let stream = dvmm_core::event::StreamId::new("VmRequest", Uuid::new_v4().to_string());
    parts
        .store
        .append(t, &stream, 0, vec![event(t, serde_json::json!({"n": 1}))])
        .await
        .expect("append through the set-up store");
    assert_eq!(other.store.load(t, &stream).await.unwrap().len(), 1);
    let request = VmRequestId::from_uuid(Uuid::new_v4());
    let claim = parts
        .work_queue
        .acquire(t, request, "setup-test", Duration::from_secs(30))
        .await
        .expect("claim through the set-up queue");
    assert!(
        matches!(claim, dvmm_core::ports::ClaimAttempt::Acquired { .. }),
        "{claim:?}"
    );

    let group = dvmm_store_postgres::app_role(parts.store.pool())
        .await
        .expect("the fresh database's application role");
    db.forget_role_later(&group);
    parts.store.pool().close().await;
    other.store.pool().close().await;
    let maintenance = db.admin_pool(1).await;
    dvmm_store_postgres::sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
    )))
    .execute(&maintenance)
    .await
    .expect("drop the fresh database");
    maintenance.close().await;
    db.drop().await;
}
