//! Aggregate replay: how fast `VmRequest` and `Vm` are rebuilt from events,
//! in memory and from the JSON envelopes a store hands back (decode + apply).
//!
//! `cargo bench -p dvmm-core --bench replay -- --warm-up-time 1 --measurement-time 3`
//!
//! Shapes:
//! - `vm_request`: N events over N/4 request streams, each the full
//!   Created → Approved → ProvisioningStarted → Ready history;
//! - `vm`: one VM stream of N events, mostly `VmGuestInfoRefreshed`;
//! - `lifecycle`: N/7 complete provisionings, each 4 request events plus 3 VM
//!   events (started, provisioned, one refresh), both aggregates rebuilt.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use chrono::{TimeZone, Utc};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_main};
use dvmm_core::event::StreamId;
use dvmm_core::ids::*;
use dvmm_core::spec::{IP_TIMEOUT_WARNING, PowerState, VmResources, VmSize};
use dvmm_core::vm::*;
use dvmm_core::vm_request::*;
use dvmm_core::{Aggregate, DomainEvent, EventMetadata, StoredEvent, VmName};
use uuid::Uuid;

const SIZES: [usize; 2] = [1_000, 100_000];

fn uuid(kind: u128, n: usize) -> Uuid {
    Uuid::from_u128((kind << 64) | n as u128)
}

fn resources() -> VmResources {
    VmResources {
        cpu: 2,
        memory_mib: 4096,
        disk_gib: 40,
    }
}

fn ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8))
}

/// The request events of one provisioning that went well.
fn request_history(n: usize) -> Vec<VmRequestEvent> {
    let name = format!("app{n}");
    let vm_name = VmName::new("web", &name).expect("valid name");
    vec![
        VmRequestEvent::VmRequestCreated(VmRequestCreated {
            request_id: VmRequestId::from_uuid(uuid(1, n)),
            tenant_id: TenantId::from_uuid(uuid(2, 0)),
            project_id: ProjectId::from_uuid(uuid(3, 0)),
            project_prefix: "web".into(),
            requested_name: name,
            vm_name,
            size: VmSize::M,
            resources: resources(),
            requested_by: UserId::from_uuid(uuid(4, n % 50)),
            justification: "staging environment for the checkout service".into(),
        }),
        VmRequestEvent::VmRequestApproved(VmRequestApproved {
            approved_by: UserId::from_uuid(uuid(5, 0)),
        }),
        VmRequestEvent::VmRequestProvisioningStarted(VmRequestProvisioningStarted {
            vm_id: VmId::from_uuid(uuid(6, n)),
        }),
        VmRequestEvent::VmRequestReady(VmRequestReady {
            vm_id: VmId::from_uuid(uuid(6, n)),
            vmware_vm_id: VmwareVmId::new(format!("vm-{}", 1000 + n)),
            ip_address: Some(ip(n)),
            hostname: format!("web-app{n}"),
            provisioned_at: None,
            warning_message: None,
        }),
    ]
}

/// A VM stream: started, provisioned without an IP, then `len - 2` refreshes
/// as the guest comes and goes.
fn vm_history(n: usize, len: usize) -> Vec<VmEvent> {
    let mut events = vec![
        VmEvent::VmProvisioningStarted(VmProvisioningStarted {
            vm_id: VmId::from_uuid(uuid(6, n)),
            request_id: VmRequestId::from_uuid(uuid(1, n)),
            tenant_id: TenantId::from_uuid(uuid(2, 0)),
            name: VmName::new("web", &format!("app{n}")).expect("valid name"),
            resources: resources(),
            folder_path: "acme/web".into(),
            placement: None,
        }),
        VmEvent::VmProvisioned(VmProvisioned {
            vmware_vm_id: VmwareVmId::new(format!("vm-{}", 1000 + n)),
            ip_address: None,
            hostname: format!("web-app{n}"),
            provisioned_at: Utc
                .timestamp_opt(1_768_469_400, 0)
                .single()
                .expect("timestamp"),
            warning_message: Some(IP_TIMEOUT_WARNING.into()),
        }),
    ];
    events.extend((0..len.saturating_sub(2)).map(|i| {
        VmEvent::VmGuestInfoRefreshed(VmGuestInfoRefreshed {
            ip_address: Some(ip(i % 7)),
            hostname: Some(format!("web-app{n}")),
            power_state: if i % 5 == 4 {
                PowerState::PoweredOff
            } else {
                PowerState::PoweredOn
            },
        })
    }));
    events.truncate(len);
    events
}

fn metadata(n: usize) -> EventMetadata {
    EventMetadata {
        event_id: EventId::from_uuid(uuid(9, n)),
        tenant_id: TenantId::from_uuid(uuid(2, 0)),
        user_id: UserId::from_uuid(uuid(5, 0)),
        correlation_id: CorrelationId::from_uuid(uuid(8, n / 7)),
        causation_id: None,
        occurred_at: Utc
            .timestamp_opt(1_768_469_400 + n as i64, 0)
            .single()
            .expect("timestamp"),
    }
}

/// The events as a store returns them: serialized and parsed back, so the
/// payloads are the `Value`s a JSON/JSONB column yields.
fn stored<E: DomainEvent>(stream_type: &str, id: Uuid, events: &[E]) -> Vec<StoredEvent> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let new_event = e.to_new_event(metadata(i));
            let envelope = StoredEvent {
                position: i as u64 + 1,
                stream_id: StreamId::new(stream_type, id),
                version: i as u64 + 1,
                event_type: new_event.event_type,
                schema_version: new_event.schema_version,
                payload: new_event.payload,
                metadata: new_event.metadata,
            };
            let text = serde_json::to_string(&envelope).expect("serializes");
            serde_json::from_str(&text).expect("parses")
        })
        .collect()
}

fn decode_and_apply<A>(stored: &[StoredEvent]) -> Option<A>
where
    A: Aggregate,
    A::Event: DomainEvent,
{
    stored.iter().fold(None, |state, s| {
        let event = A::Event::decode(s).expect("benchmark events decode");
        A::apply(state, &event)
    })
}

struct Workload {
    requests: Vec<Vec<VmRequestEvent>>,
    vm: Vec<VmEvent>,
    lifecycles: Vec<(Vec<VmRequestEvent>, Vec<VmEvent>)>,
}

impl Workload {
    fn new(n: usize) -> Self {
        Self {
            requests: (0..n / 4).map(request_history).collect(),
            vm: vm_history(0, n),
            lifecycles: (0..n / 7)
                .map(|i| (request_history(i), vm_history(i, 3)))
                .collect(),
        }
    }

    fn lifecycle_events(&self) -> usize {
        self.lifecycles.len() * 7
    }
}

fn in_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("replay_in_memory");
    group.sample_size(10);
    for n in SIZES {
        let w = Workload::new(n);
        assert!(
            Vm::reconstitute(&w.vm)
                .is_some_and(|vm| vm.status == VmStatus::Running || vm.status == VmStatus::Stopped)
        );
        group.throughput(Throughput::Elements((w.requests.len() * 4) as u64));
        group.bench_with_input(BenchmarkId::new("vm_request", n), &w, |b, w| {
            b.iter(|| {
                for stream in &w.requests {
                    black_box(VmRequest::reconstitute(black_box(stream)));
                }
            })
        });
        group.throughput(Throughput::Elements(w.vm.len() as u64));
        group.bench_with_input(BenchmarkId::new("vm", n), &w, |b, w| {
            b.iter(|| black_box(Vm::reconstitute(black_box(&w.vm))))
        });
        group.throughput(Throughput::Elements(w.lifecycle_events() as u64));
        group.bench_with_input(BenchmarkId::new("lifecycle", n), &w, |b, w| {
            b.iter(|| {
                for (request, vm) in &w.lifecycles {
                    black_box(VmRequest::reconstitute(black_box(request)));
                    black_box(Vm::reconstitute(black_box(vm)));
                }
            })
        });
    }
    group.finish();
}

fn from_stored_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("replay_stored_json");
    // One pass over 100,000 envelopes takes about a tenth of a second.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in SIZES {
        let w = Workload::new(n);
        let requests: Vec<Vec<StoredEvent>> = w
            .requests
            .iter()
            .enumerate()
            .map(|(i, s)| stored(VmRequest::STREAM_TYPE, uuid(1, i), s))
            .collect();
        let vm = stored(Vm::STREAM_TYPE, uuid(6, 0), &w.vm);
        let lifecycles: Vec<(Vec<StoredEvent>, Vec<StoredEvent>)> = w
            .lifecycles
            .iter()
            .enumerate()
            .map(|(i, (r, v))| {
                (
                    stored(VmRequest::STREAM_TYPE, uuid(1, i), r),
                    stored(Vm::STREAM_TYPE, uuid(6, i), v),
                )
            })
            .collect();
        // Decoding must rebuild the very same state as the in-memory events.
        assert_eq!(decode_and_apply::<Vm>(&vm), Vm::reconstitute(&w.vm));
        assert_eq!(
            decode_and_apply::<VmRequest>(&requests[0]),
            VmRequest::reconstitute(&w.requests[0])
        );

        group.throughput(Throughput::Elements((requests.len() * 4) as u64));
        group.bench_with_input(
            BenchmarkId::new("vm_request", n),
            &requests,
            |b, streams| {
                b.iter(|| {
                    for stream in streams {
                        black_box(decode_and_apply::<VmRequest>(black_box(stream)));
                    }
                })
            },
        );
        group.throughput(Throughput::Elements(vm.len() as u64));
        group.bench_with_input(BenchmarkId::new("vm", n), &vm, |b, vm| {
            b.iter(|| black_box(decode_and_apply::<Vm>(black_box(vm))))
        });
        group.throughput(Throughput::Elements(w.lifecycle_events() as u64));
        group.bench_with_input(BenchmarkId::new("lifecycle", n), &lifecycles, |b, ls| {
            b.iter(|| {
                for (request, vm) in ls {
                    black_box(decode_and_apply::<VmRequest>(black_box(request)));
                    black_box(decode_and_apply::<Vm>(black_box(vm)));
                }
            })
        });
    }
    group.finish();
}

/// Keeps the `pub fn` that `criterion_group!` generates out of the crate's
/// public surface, where `missing_docs` would ask for documentation of it.
mod group {
    criterion::criterion_group!(benches, super::in_memory, super::from_stored_json);
}

criterion_main!(group::benches);
