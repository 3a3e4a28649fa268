//! Where the runner's feed remembers how far it has read.

use std::future::Future;
use std::sync::Arc;

use crate::ids::TenantId;

use super::StoreError;

/// Where the feed remembers how far it has read each tenant's events.
pub trait CheckpointStore: Send + Sync {
    /// The saved position (0 if none).
    fn load(
        &self,
        name: &str,
        tenant: TenantId,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Saves a position; a position lower than the saved one is ignored.
    fn save(
        &self,
        name: &str,
        tenant: TenantId,
        position: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl<T: CheckpointStore + ?Sized> CheckpointStore for Arc<T> {
    fn load(
        &self,
        name: &str,
        tenant: TenantId,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        (**self).load(name, tenant)
    }
    fn save(
        &self,
        name: &str,
        tenant: TenantId,
        position: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).save(name, tenant, position)
    }
}
