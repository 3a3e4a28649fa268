//! Two callers on one request: exactly one of them provisions at a time
//! (the other is told who holds the claim and until when), a crashed
//! holder's claim lapses and the next caller resumes, and a caller that
//! loses its claim stops before it calls vSphere or records a failure.
//!
//! Memory adapters and the simulator, on tokio's paused clock.

mod common;

use common::PausedClock;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::ports::{ClaimAttempt, RequestClaims};
use dvmm::core::runner::WorkQueue;
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{
    Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    ProvisionOutcome, ProvisioningService, ServiceError, TenantConfig, Tenants, TokioTimer,
    VmRequestId, VmRequestStatus, VmStatus, VsphereError,
};

type Service = ProvisioningService<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
>;

const LEASE: Duration = Duration::from_secs(30);

struct World {
    sim: Simulator,
    store: Arc<MemoryEventStore>,
    timeline: Arc<MemoryTimeline>,
    clock: Arc<PausedClock>,
    queue: Arc<MemoryWorkQueue>,
    tenant: TenantConfig,
}

impl World {
    fn new() -> Self {
        let clock = PausedClock::new();
        let sim = Simulator::new(SimulatorConfig {
            delays: Delays {
                clone: Duration::from_secs(20),
                ..Delays::none()
            },
            ..SimulatorConfig::default()
        });
        Self {
            sim,
            store: Arc::new(MemoryEventStore::new()),
            timeline: Arc::new(MemoryTimeline::new()),
            queue: Arc::new(MemoryWorkQueue::with_clock(clock.clone())),
            clock,
            tenant: tenant_config("acme", 5),
        }
    }

    /// A service of one host; `shared` takes claims from the queue.
    fn service(&self, holder: &str, shared: bool) -> Service {
        let service = ProvisioningService::with_clock_and_ids(
            self.store.clone(),
            self.sim.clone(),
            self.timeline.clone(),
            Tenants::new()
                .with(self.tenant.clone())
                .expect("a valid tenant"),
            self.clock.clone(),
            dvmm::core::RandomIds,
        )
        .with_holder_name(holder);
        if shared {
            service.with_claims(self.queue.clone(), TokioTimer, LEASE)
        } else {
            service
        }
    }

    async fn approved(&self, service: &Service, name: &str) -> VmRequestId {
        let id = service
            .submit(new_request(&self.tenant, name))
            .await
            .expect("submitted");
        service
            .approve(self.tenant.tenant_id, id, user())
            .await
            .expect("approved");
        id
    }

    /// The request's and its VM's statuses.
    async fn statuses(&self, service: &Service, id: VmRequestId) -> (VmRequestStatus, VmStatus) {
        let request = service
            .request(self.tenant.tenant_id, id)
            .await
            .expect("request loads")
            .expect("request exists");
        let vm_id = request.vm_id.expect("provisioning started");
        let vm = service
            .vm(self.tenant.tenant_id, vm_id)
            .await
            .expect("vm loads")
            .expect("vm exists");
        (request.status, vm.status)
    }
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), future)
        .await
        .unwrap_or_else(|_| panic!("timed out (paused time) waiting for {what}"))
}

#[tokio::test(start_paused = true)]
async fn a_caller_finds_the_runners_claim_and_is_told_who_holds_it_until_when() {
    let world = World::new();
    let host = world.service("host-a", true);
    let id = world.approved(&host, "web01").await;
    world
        .queue
        .enqueue(world.tenant.tenant_id, id)
        .await
        .expect("queued");
    let claimed = world
        .queue
        .claim("runner-1", 8, LEASE)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), 1);

    let outcome = within(
        "the direct call",
        host.provision(world.tenant.tenant_id, id),
    )
    .await;
    match outcome.expect("no error") {
        ProvisionOutcome::Skipped { status, reason } => {
            assert_eq!(status, VmRequestStatus::Approved);
            assert!(reason.contains("runner-1"), "names the holder: {reason}");
            assert!(
                reason.contains("2026-03-02 12:00:30 UTC"),
                "names the expiry: {reason}"
            );
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    assert_eq!(
        world.sim.call_count(Operation::CreateVm),
        0,
        "vSphere untouched"
    );
    assert!(world.sim.vms().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holders_claim_lapses_and_the_next_caller_resumes() {
    let world = World::new();
    let crashed = world.service("host-crashed", true);
    let id = world.approved(&crashed, "web02").await;
    // The first host starts provisioning and dies mid-clone: its call is
    // dropped, so its claim is neither renewed nor released.
    let first = crashed.provision(world.tenant.tenant_id, id);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .is_err(),
        "the clone takes 20 s"
    );
    drop(crashed);
    let next = world.service("host-b", true);
    match next
        .provision(world.tenant.tenant_id, id)
        .await
        .expect("no error")
    {
        ProvisionOutcome::Skipped { reason, .. } => {
            assert!(reason.contains("host-crashed"), "{reason}")
        }
        other => panic!("the claim has not lapsed yet: expected Skipped, got {other:?}"),
    }
    tokio::time::sleep(LEASE).await;
    let outcome = within(
        "the resumed call",
        next.provision(world.tenant.tenant_id, id),
    )
    .await
    .expect("no error");
    assert!(
        matches!(outcome, ProvisionOutcome::Ready { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        world.sim.vms().len(),
        1,
        "the crashed call's VM was adopted"
    );
    let (request, vm) = world.statuses(&next, id).await;
    assert_eq!(request, VmRequestStatus::Ready);
    assert!(matches!(vm, VmStatus::Ready | VmStatus::Running), "{vm:?}");
    assert_eq!(
        world.queue.pending(),
        0,
        "the claim was given back as finished"
    );
}

/// Before the claim, the second call resumed the request at once; its
/// failure was recorded while the first call's VM was being created, and
/// the request ended Failed with a VM running.
#[tokio::test(start_paused = true)]
async fn a_second_caller_during_a_provisioning_neither_calls_vsphere_nor_fails_the_request() {
    let world = World::new();
    // Claims of one service (no queue), as a single process uses it.
    let service = Arc::new(world.service("host-a", false));
    let id = world.approved(&service, "web03").await;
    // A second create_vm call would fail at once.
    world.sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Nth(2),
        Fault::Error(VsphereError::TaskFailed {
            fault: "InvalidDeviceSpec".into(),
            message: "duplicate attempt".into(),
        }),
    ));
    let tenant = world.tenant.tenant_id;
    let first = tokio::spawn({
        let service = service.clone();
        async move { service.provision(tenant, id).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = within("the second call", service.provision(tenant, id))
        .await
        .expect("no error");
    assert!(
        matches!(second, ProvisionOutcome::Skipped { .. }),
        "the second caller must not provision: {second:?}"
    );
    let first = within("the first call", first)
        .await
        .expect("task ran")
        .expect("no error");
    assert!(matches!(first, ProvisionOutcome::Ready { .. }), "{first:?}");
    let (request, vm) = world.statuses(&service, id).await;
    assert_eq!(request, VmRequestStatus::Ready);
    assert!(matches!(vm, VmStatus::Ready | VmStatus::Running), "{vm:?}");
    assert_eq!(world.sim.vms().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_lost_its_claim_records_no_failure_and_the_vm_stays_ready() {
    let world = World::new();
    let a = world.service("host-a", true);
    let b = world.service("host-b", true);
    let id = world.approved(&a, "web04").await;
    let tenant = world.tenant.tenant_id;
    // Host A's create_vm (the first call) fails after its 20 s clone.
    world.sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Nth(1),
        Fault::Delay(Duration::from_secs(20)),
    ));
    world.sim.add_fault(FaultRule::new(
        Operation::CreateVm,
        Trigger::Nth(1),
        Fault::Error(VsphereError::TaskFailed {
            fault: "InvalidDeviceSpec".into(),
            message: "late failure".into(),
        }),
    ));
    let a_call = a.provision(tenant, id);
    let b_call = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A's claim is taken over (as after a lapse during a network
        // partition): B takes it and provisions.
        world.queue.release("host-a", id).await.expect("released");
        b.provision(tenant, id).await
    };
    let (a_out, b_out) = within("both calls", futures_join(a_call, b_call)).await;
    let b_out = b_out.expect("no error");
    assert!(matches!(b_out, ProvisionOutcome::Ready { .. }), "{b_out:?}");
    match a_out {
        Err(ServiceError::ClaimLost { holder, .. }) => assert_eq!(holder, "host-a"),
        Ok(ProvisionOutcome::Ready { .. }) => {}
        other => panic!("A must not record its failure: {other:?}"),
    }
    let (request, vm) = world.statuses(&a, id).await;
    assert_eq!(request, VmRequestStatus::Ready);
    assert!(matches!(vm, VmStatus::Ready | VmStatus::Running), "{vm:?}");
    assert_eq!(world.sim.vms().len(), 1);
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[tokio::test(start_paused = true)]
async fn claims_are_exclusive_reentrant_and_lapse() {
    let world = World::new();
    let tenant = world.tenant.tenant_id;
    let id = VmRequestId::from_uuid(uuid::Uuid::new_v4());
    let first = world
        .queue
        .acquire(tenant, id, "a", LEASE)
        .await
        .expect("ok");
    assert!(matches!(first, ClaimAttempt::Acquired { .. }), "{first:?}");
    let again = world
        .queue
        .acquire(tenant, id, "a", LEASE)
        .await
        .expect("ok");
    assert!(
        matches!(again, ClaimAttempt::AlreadyHeld { .. }),
        "{again:?}"
    );
    match world
        .queue
        .acquire(tenant, id, "b", LEASE)
        .await
        .expect("ok")
    {
        ClaimAttempt::HeldBy(holder) => assert_eq!(holder.holder, "a"),
        other => panic!("expected HeldBy, got {other:?}"),
    }
    assert!(
        world
            .queue
            .claim("runner", 8, LEASE)
            .await
            .expect("ok")
            .is_empty()
    );
    tokio::time::sleep(LEASE).await;
    let taken = world
        .queue
        .acquire(tenant, id, "b", LEASE)
        .await
        .expect("ok");
    assert!(matches!(taken, ClaimAttempt::Acquired { .. }), "{taken:?}");
    assert!(!world.queue.renew_claim("a", id, LEASE).await.expect("ok"));
    world.queue.release_claim("b", id, false).await.expect("ok");
    assert_eq!(
        world
            .queue
            .claim("runner", 8, LEASE)
            .await
            .expect("ok")
            .len(),
        1
    );
}
