//! Property: for any interleaving of two provisioning attempts on one
//! request, any crash points and a claim that lapses under one of them, the
//! request and its VM end in agreeing terminal states and the simulator
//! holds exactly one VM.
//!
//! Two hosts (A and B) call `provision` on the same request, sharing the
//! claims of one work queue; each may crash (its call is dropped, leaving its
//! claim to lapse), A's claim may be taken away mid-call (as after a network
//! partition), and `create_vm` may meet a lost answer, a transient failure or
//! a late failure of a second call. A third host then calls `provision`
//! until the request is settled, as an operator or runner would. Everything
//! runs on tokio's paused clock, so the 20 s clones cost no real time.

mod common;

use common::PausedClock;

use std::sync::Arc;
use std::time::Duration;

use common::{new_request, tenant_config, user};
use dvmm::core::VmId;
use dvmm::core::config::VcenterEndpoint;
use dvmm::core::event::{NewEvent, StoredEvent, StreamId};
use dvmm::core::ports::{AppendOutcome, StoreError};
use dvmm::core::ports::{PowerOffMode, PowerOffOutcome};
use dvmm::core::runner::WorkQueue;
use dvmm::core::spec::VmGuestInfo;
use dvmm::store::memory::{MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::{
    Delays, Fault, FaultRule, Operation, Simulator, SimulatorConfig, Trigger,
};
use dvmm::{
    Clock, EventStore, ProvisioningService, TenantConfig, TenantId, Tenants, TokioTimer,
    VmRequestStatus, VmStatus, VsphereError,
};
use dvmm::{VmProvisioningResult, VmSpec, VmwareVmId, VspherePort};
use proptest::prelude::*;

/// One caller's view of the shared memory store, with a latency per call (on
/// paused time) taken in turn from that caller's list: this is what lets the
/// two attempts' reads and writes interleave in any order.
struct SlowStore {
    inner: Arc<MemoryEventStore>,
    /// Extra latency of the append that marks the request ready: the window
    /// between the VM's outcome and the request's, where a crash or another
    /// attempt may fall.
    slow_ready: Duration,
    latencies_ms: Vec<u64>,
    next: std::sync::atomic::AtomicUsize,
}

impl SlowStore {
    async fn pause(&self) {
        if self.latencies_ms.is_empty() {
            return;
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ms = self.latencies_ms[n % self.latencies_ms.len()];
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

impl EventStore for SlowStore {
    async fn append(
        &self,
        tenant: TenantId,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.pause().await;
        if events.iter().any(|e| e.event_type == "VmRequestReady") {
            tokio::time::sleep(self.slow_ready).await;
        }
        self.inner
            .append(tenant, stream, expected_version, events)
            .await
    }

    async fn load(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.pause().await;
        self.inner.load(tenant, stream).await
    }

    async fn read_all(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.pause().await;
        self.inner.read_all(tenant, after, limit).await
    }
}

/// The simulator as one caller sees it: with `fails_late`, its create_vm
/// goes all the way (adopting or finishing the VM) and then fails, as a
/// duplicate attempt whose last step is refused after the other attempt
/// finished the VM.
struct Port {
    sim: Simulator,
    fails_late: bool,
}

impl VspherePort for Port {
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmProvisioningResult, VsphereError> {
        let result = self.sim.create_vm(spec).await;
        if self.fails_late && result.is_ok() {
            return Err(VsphereError::TaskFailed {
                fault: "InvalidState".into(),
                message: "the last step was refused".into(),
            });
        }
        result
    }

    async fn get_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
    ) -> Result<VmGuestInfo, VsphereError> {
        self.sim.get_vm(endpoint, id).await
    }

    async fn find_vm(&self, spec: &VmSpec) -> Result<Option<VmGuestInfo>, VsphereError> {
        self.sim.find_vm(spec).await
    }

    async fn power_off_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
        mode: PowerOffMode,
    ) -> Result<PowerOffOutcome, VsphereError> {
        self.sim.power_off_vm(endpoint, id, owner, mode).await
    }

    async fn destroy_vm(
        &self,
        endpoint: &VcenterEndpoint,
        id: &VmwareVmId,
        owner: VmId,
    ) -> Result<(), VsphereError> {
        self.sim.destroy_vm(endpoint, id, owner).await
    }
}

type Service = ProvisioningService<
    Arc<SlowStore>,
    Port,
    Arc<MemoryTimeline>,
    Arc<PausedClock>,
    dvmm::core::RandomIds,
>;

const LEASE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
enum CreateFault {
    None,
    /// The VM is created but the answer is lost (the call fails).
    LostAnswer,
    /// The call fails before anything is created, retryably.
    Transient,
    /// The second create_vm call (a duplicate or a resume) fails for good.
    SecondCallFails,
    /// Host B's calls fail for good after finishing the VM.
    BFailsLate,
}

#[derive(Clone, Debug)]
struct Case {
    a_slow_ready_secs: u64,
    a_latencies_ms: Vec<u64>,
    b_latencies_ms: Vec<u64>,
    b_starts_after: u64,
    a_crashes_after: Option<u64>,
    b_crashes_after: Option<u64>,
    a_loses_claim_after: Option<u64>,
    fault: CreateFault,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(0u64), 1u64..15],
        proptest::collection::vec(0u64..4000, 0..8),
        proptest::collection::vec(0u64..4000, 0..8),
        0u64..45,
        proptest::option::weighted(0.25, 0u64..45),
        proptest::option::weighted(0.25, 0u64..45),
        proptest::option::weighted(0.25, 0u64..45),
        prop_oneof![
            Just(CreateFault::None),
            Just(CreateFault::LostAnswer),
            Just(CreateFault::Transient),
            Just(CreateFault::SecondCallFails),
            Just(CreateFault::BFailsLate),
        ],
    )
        .prop_map(
            |(slow, a_latencies_ms, b_latencies_ms, b, ac, bc, lose, fault)| Case {
                a_slow_ready_secs: slow,
                a_latencies_ms,
                b_latencies_ms,
                b_starts_after: b,
                a_crashes_after: ac,
                b_crashes_after: bc,
                a_loses_claim_after: lose,
                fault,
            },
        )
}

/// What the callers share: one store, timeline, simulator, tenant, clock
/// and claims.
struct Shared {
    store: Arc<MemoryEventStore>,
    timeline: Arc<MemoryTimeline>,
    sim: Simulator,
    tenant: TenantConfig,
    clock: Arc<PausedClock>,
    queue: Arc<MemoryWorkQueue>,
}

impl Shared {
    /// One caller: its name, whether its create_vm fails late, its store
    /// latencies and how slowly it marks a request ready.
    fn service(
        &self,
        holder: &str,
        fails_late: bool,
        latencies_ms: &[u64],
        slow_ready: Duration,
    ) -> Service {
        ProvisioningService::with_clock_and_ids(
            Arc::new(SlowStore {
                inner: self.store.clone(),
                slow_ready,
                latencies_ms: latencies_ms.to_vec(),
                next: std::sync::atomic::AtomicUsize::new(0),
            }),
            Port {
                sim: self.sim.clone(),
                fails_late,
            },
            self.timeline.clone(),
            Tenants::new()
                .with(self.tenant.clone())
                .expect("a valid tenant"),
            self.clock.clone(),
            dvmm::core::RandomIds,
        )
        .with_holder_name(holder)
        .with_claims(self.queue.clone(), TokioTimer, LEASE)
    }
}

/// Runs `call` unless it is cut off (the caller crashes) after `crash`.
async fn run_or_crash<F: std::future::Future>(crash: Option<u64>, call: F) {
    match crash {
        Some(secs) => {
            let _ = tokio::time::timeout(Duration::from_secs(secs), call).await;
        }
        None => {
            tokio::time::timeout(Duration::from_secs(3600), call)
                .await
                .map(drop)
                .expect("an attempt ends within an hour of paused time");
        }
    }
}

async fn check(case: Case) -> Result<(), TestCaseError> {
    let clock = PausedClock::new();
    let sim = Simulator::new(SimulatorConfig {
        delays: Delays {
            clone: Duration::from_secs(20),
            power_on: Duration::from_secs(2),
            ip_report: Duration::from_secs(3),
            ..Delays::none()
        },
        ..SimulatorConfig::default()
    });
    match case.fault {
        CreateFault::None | CreateFault::BFailsLate => {}
        CreateFault::LostAnswer => sim.add_fault(FaultRule::new(
            Operation::CreateVm,
            Trigger::Nth(1),
            Fault::CreatedButCallFailed,
        )),
        CreateFault::Transient => sim.add_fault(FaultRule::new(
            Operation::CreateVm,
            Trigger::Nth(1),
            Fault::Transient,
        )),
        CreateFault::SecondCallFails => sim.add_fault(FaultRule::new(
            Operation::CreateVm,
            Trigger::Nth(2),
            Fault::Error(VsphereError::TaskFailed {
                fault: "InvalidDeviceSpec".into(),
                message: "the second call fails".into(),
            }),
        )),
    }
    let tenant = tenant_config("acme", 5);
    let store = Arc::new(MemoryEventStore::new());
    let timeline = Arc::new(MemoryTimeline::new());
    let queue = Arc::new(MemoryWorkQueue::with_clock(clock.clone()));
    let shared = Shared {
        store,
        timeline,
        sim: sim.clone(),
        tenant: tenant.clone(),
        clock: clock.clone(),
        queue: queue.clone(),
    };
    let a = shared.service(
        "host-a",
        false,
        &case.a_latencies_ms,
        Duration::from_secs(case.a_slow_ready_secs),
    );
    let b = shared.service(
        "host-b",
        matches!(case.fault, CreateFault::BFailsLate),
        &case.b_latencies_ms,
        Duration::ZERO,
    );
    let c = shared.service("host-c", false, &[], Duration::ZERO);
    let t = tenant.tenant_id;
    let id = a
        .submit(new_request(&tenant, "web01"))
        .await
        .expect("submitted");
    a.approve(t, id, user()).await.expect("approved");

    let a_call = run_or_crash(case.a_crashes_after, a.provision(t, id));
    let b_call = async {
        tokio::time::sleep(Duration::from_secs(case.b_starts_after)).await;
        run_or_crash(case.b_crashes_after, b.provision(t, id)).await;
    };
    let lapse = async {
        if let Some(secs) = case.a_loses_claim_after {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            // Only takes something away while A holds it.
            queue.release("host-a", id).await.expect("memory queue");
        }
    };
    tokio::join!(a_call, b_call, lapse);

    // Whatever is left is settled by another caller, as the runner would.
    for _ in 0..20 {
        let status = c
            .request(t, id)
            .await
            .expect("loads")
            .expect("exists")
            .status;
        if matches!(status, VmRequestStatus::Ready | VmRequestStatus::Failed) {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(600), c.provision(t, id))
            .await
            .expect("a settling call ends");
        tokio::time::sleep(LEASE).await;
    }
    let request = c.request(t, id).await.expect("loads").expect("exists");
    if std::env::var("TWO_ATTEMPTS_DEBUG").is_ok() {
        let vm = c
            .vm(t, request.vm_id.expect("id"))
            .await
            .expect("loads")
            .expect("vm");
        eprintln!(
            "request {:?} vm {:?} creates {} at {:?}",
            request.status,
            vm.status,
            sim.call_count(Operation::CreateVm),
            clock.now()
        );
    }
    prop_assert!(
        matches!(
            request.status,
            VmRequestStatus::Ready | VmRequestStatus::Failed
        ),
        "request not settled: {:?}",
        request.status
    );
    let vm_id = request.vm_id.expect("provisioning started");
    let vm = c
        .vm(t, vm_id)
        .await
        .expect("loads")
        .expect("the VM stream exists");
    match request.status {
        VmRequestStatus::Ready => prop_assert!(
            matches!(vm.status, VmStatus::Ready | VmStatus::Running),
            "request Ready but VM {:?}",
            vm.status
        ),
        _ => prop_assert_eq!(vm.status, VmStatus::Failed, "request Failed"),
    }
    // A failed request's partial VM is removed once that is recorded
    // (`VmPartialRemoved`); until then it is the one VM.
    let expected = if vm.partial_removed.is_some() { 0 } else { 1 };
    prop_assert_eq!(sim.vms().len(), expected, "VMs in the simulator");
    if let Some(vmware_id) = &vm.vmware_vm_id {
        prop_assert_eq!(
            &sim.vms()[0].vmware_vm_id,
            vmware_id,
            "the recorded VM is the one that exists"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn two_attempts_and_crashes_end_in_agreement_with_one_vm(case in cases()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(check(case))?;
    }
}

/// The case of the issue, fixed: A's claim is taken away mid-clone, B
/// takes over, adopts the VM and fails late, after A recorded the VM ready
/// but before A marked the request ready. Ready wins.
#[test]
fn a_duplicate_attempts_late_failure_does_not_fail_a_ready_vms_request() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime
        .block_on(check(Case {
            a_slow_ready_secs: 10,
            a_latencies_ms: vec![],
            b_latencies_ms: vec![],
            b_starts_after: 6,
            a_crashes_after: None,
            b_crashes_after: None,
            a_loses_claim_after: Some(5),
            fault: CreateFault::BFailsLate,
        }))
        .expect("the request and the VM agree");
}
