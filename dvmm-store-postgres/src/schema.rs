//! Migrations and roles.
//!
//! The schema is owned by an admin role that runs [`migrate`]; the
//! application connects as a login role that is a member of the database's
//! application role (created by the migrations, named by [`app_role`], see
//! [`create_app_login`]) and therefore is held to the row-level security
//! policies.

use dvmm_core::config::Secret;
use sqlx::PgPool;
use sqlx::migrate::Migrator;

use crate::error::{Error, Result};

/// The cluster-wide NOLOGIN group role of migrations 1 to 7. Since migration
/// 8 it holds no privileges in a migrated database: each database has its own
/// application role, see [`app_role`].
pub const APP_ROLE: &str = "dvmm_app";

/// The embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Applies the pending migrations, creating the tables, row-level security
/// policies and the database's application group role (see [`app_role`]).
///
/// `admin` must connect as the role that owns (or will own) the tables and
/// may create roles, e.g. the database owner or a superuser. Several processes
/// may call this at the same time: the migrator serializes them with an
/// advisory lock on the database, and creating the cluster-wide legacy role
/// tolerates losing a race with another database's migration.
///
/// # Errors
/// [`Error::Migrate`] when a migration fails or the recorded migrations do
/// not match the embedded ones.
pub async fn migrate(admin: &PgPool) -> Result<()> {
    MIGRATOR
        .run(admin)
        .await
        .map_err(|source| Error::Migrate { source })
}

/// The name of this database's application group role: a NOLOGIN role
/// whose members may `SELECT` and `INSERT` on the dvmm tables of this
/// database only (nothing in another database of the cluster), and only for
/// the tenant named by the transaction setting `dvmm.tenant_id`. Migration 8
/// names it after the database (`dvmm_app_<database>`) and records the name
/// in the database.
///
/// # Errors
/// [`Error::NotMigrated`] when the database lacks migration 8,
/// [`Error::Database`] when the query fails.
pub async fn app_role(pool: &PgPool) -> Result<String> {
    let db = |source| Error::Database {
        operation: "read the application role's name",
        source,
    };
    let recorded: bool =
        sqlx::query_scalar("SELECT to_regprocedure('dvmm_app_role()') IS NOT NULL")
            .fetch_one(pool)
            .await
            .map_err(db)?;
    if !recorded {
        return Err(Error::NotMigrated);
    }
    sqlx::query_scalar("SELECT dvmm_app_role()")
        .fetch_one(pool)
        .await
        .map_err(db)
}

/// Whether `name` is safe to use as an unquoted role name.
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Creates (or updates) the login role `role` with `password` as a member of
/// this database's application role (see [`app_role`]), for the
/// application's runtime connections. Run it with an admin connection after
/// [`migrate`]; it is idempotent: run again, it sets the new password and
/// keeps the membership.
///
/// The password never reaches the server: what is sent is a SCRAM-SHA-256
/// verifier computed here with a fresh salt ([`crate::scram_sha256_verifier`]),
/// as psql's `\password` does, so neither a statement, nor the server log,
/// nor an error can contain it. The verifier itself travels as a bound
/// parameter and is formatted into the DDL inside the server, so it stays out
/// of sqlx's statement log and `pg_stat_activity`.
///
/// An existing role that escapes the tenant policies (a superuser, a role
/// with `BYPASSRLS`, or a member of the tables' owner), or that has members
/// of its own (who would all be let in), is left unchanged and refused, so
/// this cannot reset, say, the superuser's password.
///
/// # Errors
/// [`Error::InvalidRoleName`] unless `role` is a plain lowercase identifier;
/// [`Error::EmptyPassword`] for an empty password; [`Error::NotMigrated`]
/// before [`migrate`]; [`Error::UnsafeRole`] for an existing role as above;
/// [`Error::Database`] when the admin connection may not create roles.
pub async fn create_app_login(admin: &PgPool, role: &str, password: &Secret) -> Result<()> {
    if !is_plain_identifier(role) {
        return Err(Error::InvalidRoleName {
            name: role.to_owned(),
        });
    }
    if password.expose().is_empty() {
        return Err(Error::EmptyPassword);
    }
    let verifier = crate::scram::scram_sha256_verifier(password);
    let operation = "create the application login role";
    let db = |source| Error::Database { operation, source };
    app_role(admin).await?;
    let mut tx = admin.begin().await.map_err(db)?;
    let existing: Option<(bool, bool, Option<bool>, bool)> = sqlx::query_as(
        "SELECT r.rolsuper, r.rolbypassrls, \
                (SELECT pg_has_role(r.oid, c.relowner, 'MEMBER') \
                   FROM pg_class c WHERE c.oid = to_regclass('dvmm_events')), \
                EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.roleid = r.oid) \
           FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let reason = match existing {
        Some((true, _, _, _)) => "is a superuser, which bypasses row-level security",
        Some((_, true, _, _)) => "has BYPASSRLS",
        Some((_, _, Some(true), _)) => "owns the dvmm tables",
        // Granting the application role to a group would let in every
        // member, e.g. all logins of other databases through `dvmm_app`.
        Some((_, _, _, true)) => "has members, who would all be let in",
        _ => "",
    };
    if !reason.is_empty() {
        return Err(Error::UnsafeRole {
            role: role.to_owned(),
            reason,
        });
    }
    sqlx::query(
        "SELECT set_config('dvmm.new_role', $1, true), set_config('dvmm.new_verifier', $2, true)",
    )
    .bind(role)
    .bind(&verifier)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query(
        r#"DO $$
        DECLARE
            role_name text := current_setting('dvmm.new_role');
            verifier text := current_setting('dvmm.new_verifier');
        BEGIN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', role_name, verifier);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', role_name, verifier);
            END;
            EXECUTE format('GRANT %I TO %I', dvmm_app_role(), role_name);
        END
        $$"#,
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

/// Checks that the pool's role is held to the row-level security policies
/// of this database: not a superuser, no `BYPASSRLS`, not the owner of the
/// tables (nor a member of the owning role), and a member of this database's
/// application role (see [`app_role`]), so that a login made for another
/// database of the cluster is refused.
///
/// # Errors
/// [`Error::NotMigrated`] when the tables or the application role's record
/// (migration 8) are missing, [`Error::UnsafeRole`] when the role escapes the
/// policies, [`Error::NotAppRole`] when it is not a member of this database's
/// application role, [`Error::Database`] when the check itself fails.
pub async fn verify_app_role(pool: &PgPool) -> Result<()> {
    let db = |source| Error::Database {
        operation: "check the connection's role",
        source,
    };
    let row: (String, Option<bool>, Option<bool>, Option<bool>, bool) = sqlx::query_as(
        "SELECT current_user::text, \
                (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                (SELECT rolbypassrls FROM pg_roles WHERE rolname = current_user), \
                (SELECT pg_has_role(current_user, c.relowner, 'MEMBER') \
                   FROM pg_class c WHERE c.oid = to_regclass('dvmm_events')), \
                to_regprocedure('dvmm_app_role()') IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .map_err(db)?;
    let (role, superuser, bypass, owner, recorded) = row;
    // The role first: a superuser URL on a fresh database must hear that it
    // is the wrong role, not "migrate" and then "wrong role" after that.
    let reason = match (superuser, bypass, owner) {
        (Some(true), _, _) => "is a superuser, which bypasses row-level security",
        (_, Some(true), _) => "has BYPASSRLS",
        (_, _, None) => return Err(Error::NotMigrated),
        _ if !recorded => return Err(Error::NotMigrated),
        (_, _, Some(true)) => "owns the dvmm tables",
        _ => "",
    };
    if !reason.is_empty() {
        return Err(Error::UnsafeRole { role, reason });
    }
    // USAGE, not MEMBER: the privileges must apply without SET ROLE.
    let (app_role, member): (String, bool) = sqlx::query_as(
        "SELECT dvmm_app_role(), pg_has_role(current_user, dvmm_app_role(), 'USAGE')",
    )
    .fetch_one(pool)
    .await
    .map_err(db)?;
    if member {
        Ok(())
    } else {
        Err(Error::NotAppRole { role, app_role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_plain_identifiers() {
        for ok in ["dvmm_app_login", "_x", "a1"] {
            assert!(is_plain_identifier(ok), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Upper",
            "a-b",
            "a b",
            "x\"; DROP",
            &"a".repeat(64),
        ] {
            assert!(!is_plain_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn migrations_are_embedded() {
        assert!(MIGRATOR.iter().count() >= 1);
        assert!(
            MIGRATOR
                .iter()
                .any(|m| m.sql.as_str().contains("FORCE ROW LEVEL SECURITY"))
        );
    }
}
