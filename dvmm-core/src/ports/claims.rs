//! Exclusive, expiring claims on requests (one provisioner per request).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::ids::{TenantId, VmRequestId};

use super::{BoxFuture, StoreError};

/// Who holds a request's provisioning claim, and until when (on the claim
/// store's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimHolder {
    /// The holder's name (a runner's worker id, or the name a host gave its
    /// service).
    pub holder: String,
    /// When the claim lapses unless its holder renews it.
    pub until: DateTime<Utc>,
}

/// What [`RequestClaims::acquire`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimAttempt {
    /// The caller holds the claim now, until `until`; it must renew it while
    /// it works and give it back with [`RequestClaims::release_claim`].
    Acquired {
        /// When it lapses unless renewed.
        until: DateTime<Utc>,
    },
    /// The caller already held the claim (a runner calling the service for a
    /// job it leased): it was extended, and whoever took it first keeps
    /// renewing and releasing it.
    AlreadyHeld {
        /// When it lapses unless renewed.
        until: DateTime<Utc>,
    },
    /// Someone else holds it and it has not lapsed.
    HeldBy(ClaimHolder),
}

/// Exclusive, expiring claims on requests: only the holder of a request's
/// claim may call vSphere for it. One store of claims must be shared by
/// every caller of one deployment (runners and hosts calling
/// `provision` directly), which is why the work queues implement it on their
/// job rows: a runner's lease on a job *is* the claim.
///
/// Futures are boxed so a service can hold the port as a trait object.
pub trait RequestClaims: Send + Sync {
    /// Takes the claim for `holder` for `lease` when it is free or has lapsed
    /// (a crashed holder's claim expires), extends it when `holder` already
    /// has it, or says who has it.
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>>;

    /// Extends `holder`'s claim by `lease` from now; `false` when `holder`
    /// no longer has it (it lapsed and another caller took it).
    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives the claim back (only if `holder` has it). `finished` says the
    /// request needs no more work (its outcome is recorded); otherwise it is
    /// left for the next caller at once.
    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl<T: RequestClaims + ?Sized> RequestClaims for Arc<T> {
    fn acquire<'a>(
        &'a self,
        tenant: TenantId,
        request_id: VmRequestId,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimAttempt, StoreError>> {
        (**self).acquire(tenant, request_id, holder, lease)
    }

    fn renew_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).renew_claim(holder, request_id, lease)
    }

    fn release_claim<'a>(
        &'a self,
        holder: &'a str,
        request_id: VmRequestId,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).release_claim(holder, request_id, finished)
    }
}
