//! The registry of tenant configurations the service serves.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{ConfigError, TenantConfig};
use crate::ids::TenantId;

/// Tenant configurations the service knows, by tenant id.
#[derive(Clone, Debug, Default)]
pub struct Tenants {
    pub(super) by_id: HashMap<TenantId, Arc<TenantConfig>>,
}

impl Tenants {
    /// No tenants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tenant's configuration, once it is valid.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad field (see
    /// [`TenantConfig::validate`]); nothing is added then.
    pub fn with(mut self, config: TenantConfig) -> Result<Self, ConfigError> {
        self.insert(config)?;
        Ok(self)
    }

    /// Adds (or replaces) a tenant's configuration, once it is valid: a
    /// configuration built in code has not been through the checks that
    /// loading one from a file applies.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad field; nothing is added then.
    pub fn insert(&mut self, config: TenantConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.by_id.insert(config.tenant_id, Arc::new(config));
        Ok(())
    }

    /// Every registered tenant id.
    pub fn ids(&self) -> impl Iterator<Item = TenantId> + '_ {
        self.by_id.keys().copied()
    }

    /// A tenant's configuration.
    pub fn get(&self, tenant: TenantId) -> Option<&Arc<TenantConfig>> {
        self.by_id.get(&tenant)
    }
}
