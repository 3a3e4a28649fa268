//! Transactions scoped to one tenant.
//!
//! Row-level security reads the tenant from the setting `dvmm.tenant_id`.
//! It is set with `set_config(.., true)`, i.e. for the current transaction
//! only, so a pooled connection never carries one tenant's scope into the
//! next caller's work.

use dvmm_core::ids::TenantId;
use dvmm_core::ports::StoreError;
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::backend;

/// The statement that opens a transaction scoped to `tenant`.
///
/// The setting travels in the same simple-query message as `BEGIN`, saving a
/// round trip on every store call. Formatting it into the text is safe: a
/// UUID's hyphenated form has only hex digits and hyphens.
fn begin_statement(tenant: TenantId) -> String {
    format!(
        "BEGIN; SELECT set_config('dvmm.tenant_id', '{}', true)",
        tenant.as_uuid().hyphenated()
    )
}

/// Opens a transaction in which the row-level security policies admit only
/// `tenant`'s rows.
pub(crate) async fn begin_for_tenant(
    pool: &PgPool,
    tenant: TenantId,
    operation: &'static str,
) -> Result<Transaction<'static, Postgres>, StoreError> {
    // The statement holds only the tenant's UUID, printed by `uuid` itself.
    pool.begin_with(sqlx::AssertSqlSafe(begin_statement(tenant)))
        .await
        .map_err(|e| backend(operation, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_is_a_plain_uuid_literal() {
        let tenant = TenantId::from_uuid(uuid::Uuid::from_u128(0xabcdef));
        assert_eq!(
            begin_statement(tenant),
            "BEGIN; SELECT set_config('dvmm.tenant_id', '00000000-0000-0000-0000-000000abcdef', true)"
        );
    }
}
