//! Poison events stay local: the runner's feed records and skips, per
//! tenant, an approval it cannot read, and stops only the tenant whose
//! events a newer release wrote. Memory store and simulator.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::{new_request, tenant_config, user};
use dvmm::core::runner::{CheckpointStore, FeedReport};
use dvmm::store::memory::{MemoryCheckpoints, MemoryEventStore, MemoryTimeline, MemoryWorkQueue};
use dvmm::vsphere::sim::Simulator;
use dvmm::{
    Backoff, CorrelationId, EventId, EventMetadata, EventStore, NewEvent, ProvisioningRunner,
    ProvisioningService, RunnerConfig, StreamId, TenantConfig, TenantId, Tenants, TokioTimer,
    UserId, VmRequestId, VmRequestStatus,
};
use serde_json::{Value, json};
use uuid::Uuid;

type Service = ProvisioningService<Arc<MemoryEventStore>, Simulator, Arc<MemoryTimeline>>;
type Runner = ProvisioningRunner<
    Arc<MemoryEventStore>,
    Simulator,
    Arc<MemoryTimeline>,
    dvmm::core::SystemClock,
    dvmm::core::RandomIds,
    Arc<MemoryWorkQueue>,
    Arc<MemoryCheckpoints>,
    TokioTimer,
>;

struct Setup {
    service: Arc<Service>,
    store: Arc<MemoryEventStore>,
    a: TenantConfig,
    b: TenantConfig,
    queue: Arc<MemoryWorkQueue>,
    checkpoints: Arc<MemoryCheckpoints>,
}

fn setup() -> Setup {
    let a = tenant_config("acme", 5);
    let b = tenant_config("beta", 5);
    let store = Arc::new(MemoryEventStore::new());
    let service = Arc::new(ProvisioningService::new(
        store.clone(),
        Simulator::default(),
        Arc::new(MemoryTimeline::new()),
        Tenants::new()
            .with(a.clone())
            .and_then(|t| t.with(b.clone()))
            .expect("valid tenant configurations"),
    ));
    Setup {
        service,
        store,
        a,
        b,
        queue: Arc::new(MemoryWorkQueue::new()),
        checkpoints: Arc::new(MemoryCheckpoints::new()),
    }
}

impl Setup {
    fn runner(&self) -> Runner {
        ProvisioningRunner::new(
            self.service.clone(),
            self.queue.clone(),
            self.checkpoints.clone(),
            TokioTimer,
            RunnerConfig {
                worker_id: "poison-test".into(),
                poll_interval: Duration::from_millis(5),
                backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
                shutdown_deadline: Duration::from_secs(5),
                ..RunnerConfig::default()
            },
        )
        .expect("a valid runner configuration")
    }

    async fn approve(&self, tenant: &TenantConfig, name: &str) -> VmRequestId {
        let id = self
            .service
            .submit(new_request(tenant, name))
            .await
            .unwrap();
        self.service
            .approve(tenant.tenant_id, id, user())
            .await
            .unwrap();
        id
    }

    /// Appends a raw approval as another writer (a bug, a newer release)
    /// might have; returns its position.
    async fn append_raw(
        &self,
        tenant: TenantId,
        stream_id: &str,
        schema_version: u32,
        payload: Value,
    ) -> u64 {
        let stream = StreamId::new("VmRequest", stream_id);
        let event = NewEvent {
            event_type: "VmRequestApproved".into(),
            schema_version,
            payload,
            metadata: EventMetadata {
                event_id: EventId::from_uuid(Uuid::new_v4()),
                tenant_id: tenant,
                user_id: UserId::from_uuid(Uuid::new_v4()),
                correlation_id: CorrelationId::from_uuid(Uuid::new_v4()),
                causation_id: None,
                occurred_at: Utc::now(),
            },
        };
        self.store
            .append(tenant, &stream, 0, vec![event])
            .await
            .unwrap();
        let all = self.store.read_all(tenant, 0, 10_000).await.unwrap();
        all.last().expect("just appended").position
    }

    async fn last_position(&self, tenant: TenantId) -> u64 {
        let all = self.store.read_all(tenant, 0, 10_000).await.unwrap();
        all.last().map_or(0, |e| e.position)
    }

    async fn checkpoint(&self, tenant: TenantId) -> u64 {
        self.checkpoints.load("provisioning", tenant).await.unwrap()
    }
}

/// Collects what the runner logs, to check the error lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log of this test binary. One global subscriber for all tests: a
/// per-test default subscriber races with the other tests' over tracing's
/// per-callsite interest cache and can miss lines. Tests tell their lines
/// apart by their tenant ids.
fn capture() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        logs
    })
    .clone()
}

fn lines_with<'a>(logs: &'a str, needle: &str) -> Vec<&'a str> {
    logs.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test]
async fn an_approval_that_cannot_be_read_is_logged_counted_and_skipped_and_other_tenants_flow() {
    let logs = capture();
    let s = setup();
    let first = s.approve(&s.a, "app01").await;
    let bad_stream = Uuid::new_v4().to_string();
    let malformed = s
        .append_raw(
            s.a.tenant_id,
            &bad_stream,
            1,
            json!({ "approved_by": "not a user id" }),
        )
        .await;
    let not_a_request = s
        .append_raw(
            s.a.tenant_id,
            "not-a-uuid",
            1,
            json!({ "approved_by": Uuid::new_v4().to_string() }),
        )
        .await;
    let after = s.approve(&s.a, "app02").await;
    let other = s.approve(&s.b, "app03").await;

    let report: FeedReport = s.runner().feed().await.expect("poison is not a feed error");
    assert_eq!(
        report.offered, 3,
        "both good approvals of A and B's: {report:?}"
    );
    assert!(report.stopped.is_empty(), "{report:?}");
    let positions: Vec<u64> = report.poisoned.iter().map(|p| p.position).collect();
    assert_eq!(positions, vec![malformed, not_a_request]);
    assert!(report.poisoned.iter().all(|p| p.tenant == s.a.tenant_id));
    assert_eq!(report.poisoned[0].stream.id, bad_stream);
    assert!(
        report.poisoned[0].reason.contains("malformed payload"),
        "{report:?}"
    );
    assert!(
        report.poisoned[1].reason.contains("not a request id"),
        "{report:?}"
    );
    assert_eq!(s.queue.pending(), 3, "{first} {after} {other} queued");
    assert_eq!(
        s.checkpoint(s.a.tenant_id).await,
        s.last_position(s.a.tenant_id).await,
        "the checkpoint moved past the poison"
    );
    assert_eq!(
        s.checkpoint(s.b.tenant_id).await,
        s.last_position(s.b.tenant_id).await
    );

    let logs = logs.text();
    let errors: Vec<&str> = lines_with(&logs, &s.a.tenant_id.to_string())
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert_eq!(errors.len(), 2, "one error line per poison event:\n{logs}");
    assert!(
        errors[0].contains(&format!("VmRequest-{bad_stream}")),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains(&format!("position={malformed}")),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("malformed payload"), "{}", errors[0]);

    // Read once: the next pass has nothing to say.
    let again = s.runner().feed().await.unwrap();
    assert_eq!(again, FeedReport::default());
}

#[tokio::test]
async fn an_event_of_a_newer_release_stops_only_its_tenant_with_an_upgrade_error() {
    let logs = capture();
    let s = setup();
    s.approve(&s.a, "app01").await;
    let future = s
        .append_raw(
            s.a.tenant_id,
            &Uuid::new_v4().to_string(),
            99,
            json!({ "approved_by": Uuid::new_v4().to_string(), "new_field": true }),
        )
        .await;
    s.approve(&s.a, "app02").await;
    s.approve(&s.b, "app03").await;

    let runner = s.runner();
    let report = runner
        .feed()
        .await
        .expect("a stopped tenant is not a feed error");
    assert_eq!(
        report.offered, 2,
        "A's approval before it, and B's: {report:?}"
    );
    assert!(report.poisoned.is_empty());
    assert_eq!(report.stopped.len(), 1);
    assert_eq!(report.stopped[0].tenant, s.a.tenant_id);
    assert_eq!(report.stopped[0].position, future);
    assert!(report.stopped[0].reason.contains("99"), "{report:?}");
    assert_eq!(
        s.checkpoint(s.a.tenant_id).await,
        future - 1,
        "A's checkpoint stops just before the newer event"
    );
    assert_eq!(
        s.checkpoint(s.b.tenant_id).await,
        s.last_position(s.b.tenant_id).await,
        "B flows on"
    );
    // It stays stopped, and says so once.
    let again = runner.feed().await.unwrap();
    assert_eq!(again.offered, 0);
    assert_eq!(again.stopped.len(), 1);
    assert_eq!(s.checkpoint(s.a.tenant_id).await, future - 1);
    let logs = logs.text();
    let upgrade: Vec<&str> = lines_with(&logs, "upgrade dvmm")
        .into_iter()
        .filter(|l| l.contains(&s.a.tenant_id.to_string()))
        .collect();
    assert_eq!(upgrade.len(), 1, "logged once:\n{logs}");
    assert!(upgrade[0].contains("ERROR"), "{}", upgrade[0]);
    assert!(
        upgrade[0].contains(&format!("position={future}")),
        "{}",
        upgrade[0]
    );
}

#[tokio::test]
async fn a_running_runner_provisions_around_poison_and_counts_it_once() {
    let s = setup();
    let good_a = s.approve(&s.a, "app01").await;
    s.append_raw(
        s.a.tenant_id,
        &Uuid::new_v4().to_string(),
        1,
        json!({ "approved_by": 7 }),
    )
    .await;
    let good_a2 = s.approve(&s.a, "app02").await;
    let good_b = s.approve(&s.b, "app03").await;
    s.append_raw(
        s.b.tenant_id,
        &Uuid::new_v4().to_string(),
        2,
        json!({ "approved_by": Uuid::new_v4().to_string() }),
    )
    .await;
    let after_stop = s.approve(&s.b, "app04").await;

    let runner = s.runner();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = runner.run(async {
        let _ = stop_rx.await;
    });
    let watch = async {
        let ready = |tenant: TenantId, id: VmRequestId| {
            let service = s.service.clone();
            async move {
                service.request(tenant, id).await.unwrap().unwrap().status == VmRequestStatus::Ready
            }
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if ready(s.a.tenant_id, good_a).await
                    && ready(s.a.tenant_id, good_a2).await
                    && ready(s.b.tenant_id, good_b).await
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the three readable approvals become Ready within 30 s");
        // A few more polls: the poison must not be counted again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop_tx.send(());
    };
    let (report, ()) = tokio::join!(run, watch);
    let report = report.unwrap();
    assert_eq!(report.ready, 3, "{report:?}");
    assert_eq!(report.poison_events, 1, "counted once: {report:?}");
    assert_eq!(report.stopped_feeds, 1, "{report:?}");
    let status = s
        .service
        .request(s.b.tenant_id, after_stop)
        .await
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(
        status,
        VmRequestStatus::Approved,
        "behind the newer event: left for the newer release"
    );
}
