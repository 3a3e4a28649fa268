//! Ports that yield before and after every call, so each port call is a
//! point where the caller's future can be dropped (a crash), both before and
//! after the call's effect. Shared by the crash tests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use dvmm::core::VmId;
use dvmm::core::config::VcenterEndpoint;
use dvmm::core::ports::{PowerOffMode, PowerOffOutcome, ProgressReporter};
use dvmm::core::spec::VmGuestInfo;
use dvmm::{
    AppendOutcome, EventStore, NewEvent, StoreError, StoredEvent, StreamId, TenantId,
    TimelineEntry, TimelineSink, VmProvisioningResult, VmRequestId, VmSpec, VmwareVmId,
    VsphereError, VspherePort,
};

/// Returns `Pending` once, so every port call becomes a point where the
/// caller's future can be dropped, both before and after the call's effect.
pub struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

pub fn pause() -> YieldOnce {
    YieldOnce(false)
}

/// Wraps a port so each call yields before and after it runs.
pub struct Stepping<T>(pub T);

impl<T: EventStore> EventStore for Stepping<T> {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        pause().await;
        let result = self
            .0
            .append(tenant, stream, expected_version, events)
            .await;
        pause().await;
        result
    }
    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        pause().await;
        self.0.load(tenant, stream).await
    }
    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.read_all(tenant, after, limit).await
    }
}

impl<T: TimelineSink> TimelineSink for Stepping<T> {
    async fn record(&self, entry: TimelineEntry) -> Result<(), StoreError> {
        pause().await;
        let result = self.0.record(entry).await;
        pause().await;
        result
    }
    async fn list(
        &self,
        tenant: TenantId,
        request_id: VmRequestId,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        self.0.list(tenant, request_id).await
    }
}

impl<T: VspherePort> VspherePort for Stepping<T> {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        pause().await;
        let result = self.0.create_vm(spec).await;
        pause().await;
        result
    }
    async fn create_vm_reporting(
        &self,
        spec: &VmSpec,
        progress: ProgressReporter<'_>,
    ) -> Result<VmProvisioningResult, VsphereError> {
        pause().await;
        let result = self.0.create_vm_reporting(spec, progress).await;
        pause().await;
        result
    }
    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        pause().await;
        let result = self.0.get_vm(endpoint, id).await;
        pause().await;
        result
    }
    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        pause().await;
        let result = self.0.find_vm(spec).await;
        pause().await;
        result
    }
    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        pause().await;
        let result = self.0.power_off_vm(endpoint, id, owner, mode).await;
        pause().await;
        result
    }
    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        pause().await;
        let result = self.0.destroy_vm(endpoint, id, owner).await;
        pause().await;
        result
    }
}
