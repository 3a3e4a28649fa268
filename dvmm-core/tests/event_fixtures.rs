//! Stored events written by this release must load in every later release.
//!
//! `fixtures/events_v1/` holds one hand-written `StoredEvent` envelope per
//! event type at schema version 1, exactly as a store hands it back. The files
//! are the promise: they are never regenerated from the current structs. When a
//! payload changes shape, the new release bumps the schema version, adds an
//! upcaster, and these files must still decode.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use dvmm_core::event::{EventDecodeError, Upcasters};
use dvmm_core::ids::*;
use dvmm_core::spec::{PowerState, VmResources, VmSize};
use dvmm_core::vm::VmEvent;
use dvmm_core::vm_request::VmRequestEvent;
use dvmm_core::{DomainEvent, StoredEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const TENANT: &str = "0b3f6c9e-2a41-4d8e-9c55-7a1e2f4b8d01";
const PROJECT: &str = "5d2c8e71-9b40-4f3a-a6e2-1c7d9e0f3a12";
const REQUEST: &str = "a1c4e7f0-3b6d-4a9c-8e21-5f8b2d7c4e03";
const VM: &str = "c9e2b5a8-7d14-4f6b-b3a0-2e9d8c1f5a04";
const REQUESTER: &str = "e4f7a2c5-8b31-4d6e-9f02-3a5c7e9b1d05";
const APPROVER: &str = "f1a3c5e7-9b2d-4f60-8a4c-6e8f0b2d4f06";
const FAILURE_MESSAGE: &str = "cluster compute-01 has not enough free memory for 4096 MiB; retry later or choose a smaller size";

/// Every event type the request stream knows.
const REQUEST_EVENT_TYPES: [&str; 11] = [
    "VmRequestCreated",
    "VmRequestApproved",
    "VmRequestRejected",
    "VmRequestCancelled",
    "VmRequestProvisioningStarted",
    "VmRequestReady",
    "VmRequestProvisioningFailed",
    "VmRequestWaitingForVcenter",
    "VmRequestVcenterReachable",
    "VmRequestRetried",
    "VmRequestCustomizingGuest",
];

/// Every event type the VM stream knows.
const VM_EVENT_TYPES: [&str; 7] = [
    "VmProvisioningStarted",
    "VmProvisioned",
    "VmProvisioningFailed",
    "VmGuestInfoRefreshed",
    "VmDeleted",
    "VmPartialRemoved",
    "VmPowerStateObserved",
];

/// The lists above must follow the enums. These matches have no wildcard, so a
/// new variant fails to compile here until it is added to the lists, and then
/// `every_known_event_type_has_a_v1_fixture` wants its fixture file.
fn request_type_name(event: &VmRequestEvent) -> &'static str {
    match event {
        VmRequestEvent::VmRequestCreated(_) => REQUEST_EVENT_TYPES[0],
        VmRequestEvent::VmRequestApproved(_) => REQUEST_EVENT_TYPES[1],
        VmRequestEvent::VmRequestRejected(_) => REQUEST_EVENT_TYPES[2],
        VmRequestEvent::VmRequestCancelled(_) => REQUEST_EVENT_TYPES[3],
        VmRequestEvent::VmRequestProvisioningStarted(_) => REQUEST_EVENT_TYPES[4],
        VmRequestEvent::VmRequestReady(_) => REQUEST_EVENT_TYPES[5],
        VmRequestEvent::VmRequestProvisioningFailed(_) => REQUEST_EVENT_TYPES[6],
        VmRequestEvent::VmRequestWaitingForVcenter(_) => REQUEST_EVENT_TYPES[7],
        VmRequestEvent::VmRequestVcenterReachable(_) => REQUEST_EVENT_TYPES[8],
        VmRequestEvent::VmRequestRetried(_) => REQUEST_EVENT_TYPES[9],
        VmRequestEvent::VmRequestCustomizingGuest(_) => REQUEST_EVENT_TYPES[10],
    }
}

fn vm_type_name(event: &VmEvent) -> &'static str {
    match event {
        VmEvent::VmProvisioningStarted(_) => VM_EVENT_TYPES[0],
        VmEvent::VmProvisioned(_) => VM_EVENT_TYPES[1],
        VmEvent::VmProvisioningFailed(_) => VM_EVENT_TYPES[2],
        VmEvent::VmGuestInfoRefreshed(_) => VM_EVENT_TYPES[3],
        VmEvent::VmDeleted(_) => VM_EVENT_TYPES[4],
        VmEvent::VmPartialRemoved(_) => VM_EVENT_TYPES[5],
        VmEvent::VmPowerStateObserved(_) => VM_EVENT_TYPES[6],
    }
}

#[derive(Debug)]
enum Decoded {
    Request(VmRequestEvent),
    Vm(VmEvent),
}

impl Decoded {
    fn type_name(&self) -> &'static str {
        match self {
            Decoded::Request(e) => request_type_name(e),
            Decoded::Vm(e) => vm_type_name(e),
        }
    }

    fn event_type(&self) -> &'static str {
        match self {
            Decoded::Request(e) => e.event_type(),
            Decoded::Vm(e) => e.event_type(),
        }
    }

    fn to_payload(&self) -> Value {
        match self {
            Decoded::Request(e) => e.to_payload(),
            Decoded::Vm(e) => e.to_payload(),
        }
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events_v1")
}

/// The file as raw JSON and as an envelope.
fn load_fixture(event_type: &str) -> (Value, StoredEvent) {
    let path = fixture_dir().join(format!("{event_type}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
    let raw: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fixture {} is not JSON: {e}", path.display()));
    let stored: StoredEvent = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("fixture {} is not a StoredEvent: {e}", path.display()));
    (raw, stored)
}

/// Decodes by stream type, as a repository that loads a stream does.
fn decode(stored: &StoredEvent) -> Decoded {
    match stored.stream_id.stream_type.as_str() {
        "VmRequest" => Decoded::Request(
            VmRequestEvent::decode(stored)
                .unwrap_or_else(|e| panic!("{} does not decode: {e}", stored.event_type)),
        ),
        "Vm" => Decoded::Vm(
            VmEvent::decode(stored)
                .unwrap_or_else(|e| panic!("{} does not decode: {e}", stored.event_type)),
        ),
        other => panic!(
            "fixture {} has unknown stream type {other}",
            stored.event_type
        ),
    }
}

fn uuid(s: &str) -> uuid::Uuid {
    s.parse().expect("fixture constant is a UUID")
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test timestamp")
        .with_timezone(&Utc)
}

fn m_resources() -> VmResources {
    VmResources {
        cpu: 2,
        memory_mib: 4096,
        disk_gib: 40,
    }
}

#[test]
fn every_known_event_type_has_a_v1_fixture_and_nothing_else_is_there() {
    let known: BTreeSet<&str> = REQUEST_EVENT_TYPES
        .iter()
        .chain(VM_EVENT_TYPES.iter())
        .copied()
        .collect();
    assert_eq!(known.len(), 18, "type names are distinct");
    for name in REQUEST_EVENT_TYPES {
        let expected = if name == "VmRequestReady" { 2 } else { 1 };
        assert_eq!(
            VmRequestEvent::current_version(name),
            Some(expected),
            "{name} is a request event at schema version {expected}"
        );
        assert_eq!(
            VmEvent::current_version(name),
            None,
            "{name} is not a VM event"
        );
    }
    for name in VM_EVENT_TYPES {
        let expected = if name == "VmProvisioningStarted" {
            2
        } else {
            1
        };
        assert_eq!(
            VmEvent::current_version(name),
            Some(expected),
            "{name} is a VM event at v{expected}"
        );
        assert_eq!(VmRequestEvent::current_version(name), None);
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(fixture_dir())
        .expect("fixture directory")
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            assert_eq!(
                path.extension().and_then(|e| e.to_str()),
                Some("json"),
                "only JSON fixtures belong in {}",
                fixture_dir().display()
            );
            path.file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 file name")
                .to_owned()
        })
        .collect();
    let on_disk: BTreeSet<&str> = on_disk.iter().map(String::as_str).collect();
    assert_eq!(on_disk, known, "exactly one fixture per known event type");
}

#[test]
fn every_fixture_decodes_and_re_encodes_to_the_same_payload() {
    for name in REQUEST_EVENT_TYPES.iter().chain(VM_EVENT_TYPES.iter()) {
        let (raw, stored) = load_fixture(name);
        assert_eq!(stored.event_type, *name, "file name matches event_type");
        assert_eq!(stored.schema_version, 1, "{name} fixture is schema v1");
        let decoded = decode(&stored);
        assert_eq!(decoded.event_type(), *name);
        assert_eq!(decoded.type_name(), *name);
        // A type whose schema moved on re-encodes in its current version:
        // the v1 payload lifted by this release's upcasters.
        let current = VmRequestEvent::current_version(name)
            .or_else(|| VmEvent::current_version(name))
            .expect("known type");
        let lifted = Upcasters::builtin()
            .lift(name, 1, current, stored.payload.clone())
            .expect("every v1 payload lifts to the current version");
        assert_eq!(
            decoded.to_payload(),
            lifted,
            "{name} re-encodes to the stored payload, upcast to v{current}"
        );
        // The envelope itself (metadata, ids, timestamps) survives as well.
        assert_eq!(
            serde_json::to_value(&stored).expect("envelope serializes"),
            raw,
            "{name} envelope round trip"
        );
        assert_eq!(stored.metadata.tenant_id.to_string(), TENANT);
        let new_event = match &decoded {
            Decoded::Request(e) => e.to_new_event(stored.metadata.clone()),
            Decoded::Vm(e) => e.to_new_event(stored.metadata.clone()),
        };
        assert_eq!(new_event.event_type, stored.event_type);
        assert_eq!(new_event.schema_version, current);
        assert_eq!(new_event.payload, lifted);
    }
}

fn v2_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events_v2")
}

/// Event types whose current schema is version 2: each has a v2 fixture,
/// hand-written like the v1 ones, and nothing else is there.
const V2_EVENT_TYPES: [&str; 2] = ["VmProvisioningStarted", "VmRequestReady"];

#[test]
fn every_v2_type_has_a_v2_fixture_that_round_trips() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(v2_fixture_dir())
        .expect("v2 fixture directory")
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            path.file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 file name")
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = V2_EVENT_TYPES.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(on_disk, expected);
    for name in REQUEST_EVENT_TYPES.iter().chain(VM_EVENT_TYPES.iter()) {
        let current = VmRequestEvent::current_version(name)
            .or_else(|| VmEvent::current_version(name))
            .expect("known type");
        assert_eq!(
            current == 2,
            V2_EVENT_TYPES.contains(name),
            "{name} at v{current}: the v2 list follows the enums"
        );
    }
    for name in V2_EVENT_TYPES {
        let path = v2_fixture_dir().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).expect("v2 fixture");
        let raw: Value = serde_json::from_str(&text).expect("JSON");
        let stored: StoredEvent = serde_json::from_value(raw.clone()).expect("envelope");
        assert_eq!(stored.schema_version, 2);
        let decoded = decode(&stored);
        assert_eq!(decoded.to_payload(), stored.payload, "{name} v2 round trip");
        assert_eq!(serde_json::to_value(&stored).expect("serializes"), raw);
    }
}

#[test]
fn provisioning_started_v2_carries_the_placement_and_v1_reads_without_one() {
    let path = v2_fixture_dir().join("VmProvisioningStarted.json");
    let stored: StoredEvent =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("envelope");
    let Decoded::Vm(VmEvent::VmProvisioningStarted(e)) = decode(&stored) else {
        panic!("a VM start")
    };
    assert_eq!(e.folder_path, "dvmm/acme/web");
    let placement = e.placement.expect("v2 records the placement");
    assert_eq!(placement.endpoint_url, "https://vc01.example.com/sdk");
    assert_eq!(placement.datacenter, "DC-Frankfurt");
    assert_eq!(placement.cluster, "compute-01");
    assert_eq!(placement.resource_pool.as_deref(), Some("tenants/acme"));
    assert_eq!(placement.datastore, "vsan-01");
    assert_eq!(placement.network, "pg-web");
    assert_eq!(placement.template, "ubuntu-22.04");
    assert_eq!(placement.folder_path, "dvmm/acme/web");
    assert_eq!(placement.hostname.as_str(), "web-app01");
    assert_eq!((placement.ip_wait_secs, placement.task_secs), (300, 1800));
    assert!(
        !stored.payload.to_string().contains("password"),
        "the placement never records credentials"
    );

    let (_, v1) = load_fixture("VmProvisioningStarted");
    let Decoded::Vm(VmEvent::VmProvisioningStarted(e)) = decode(&v1) else {
        panic!("a VM start")
    };
    assert_eq!(e.placement, None, "v1 did not record a placement");
    assert_eq!(e.folder_path, "acme/web");

    // The upcaster refuses what is not an object rather than guessing.
    let mut broken = v1.clone();
    broken.payload = json!(["not", "an", "object"]);
    assert!(matches!(
        VmEvent::decode(&broken),
        Err(EventDecodeError::Upcast { from: 1, .. })
    ));
}

#[test]
fn request_fixtures_carry_their_values() {
    let request_id = VmRequestId::from_uuid(uuid(REQUEST));
    let vm_id = VmId::from_uuid(uuid(VM));
    let requester = UserId::from_uuid(uuid(REQUESTER));
    let approver = UserId::from_uuid(uuid(APPROVER));
    for name in REQUEST_EVENT_TYPES {
        let (_, stored) = load_fixture(name);
        assert_eq!(stored.stream_id.stream_type, "VmRequest");
        assert_eq!(stored.stream_id.id, REQUEST);
        let Decoded::Request(event) = decode(&stored) else {
            unreachable!("request stream decodes to request events")
        };
        match event {
            VmRequestEvent::VmRequestCreated(e) => {
                assert_eq!(stored.version, 1);
                assert_eq!(stored.position, 101);
                assert_eq!(stored.metadata.causation_id, None);
                assert_eq!(stored.metadata.occurred_at, time("2026-01-15T09:30:00Z"));
                assert_eq!(e.request_id, request_id);
                assert_eq!(e.tenant_id, TenantId::from_uuid(uuid(TENANT)));
                assert_eq!(e.project_id, ProjectId::from_uuid(uuid(PROJECT)));
                assert_eq!(e.project_prefix, "web");
                assert_eq!(e.requested_name, "app01");
                assert_eq!(e.vm_name.as_str(), "web-app01");
                assert_eq!(e.size, VmSize::M);
                assert_eq!(e.resources, m_resources());
                assert_eq!(e.requested_by, requester);
                assert_eq!(
                    e.justification,
                    "staging environment for the checkout service"
                );
            }
            VmRequestEvent::VmRequestApproved(e) => {
                assert_eq!(stored.version, 2);
                assert_eq!(e.approved_by, approver);
                assert_eq!(stored.metadata.user_id, approver);
            }
            VmRequestEvent::VmRequestRejected(e) => {
                assert_eq!(e.rejected_by, approver);
                assert_eq!(e.reason, "use the shared staging cluster instead");
            }
            VmRequestEvent::VmRequestCancelled(e) => {
                assert_eq!(e.cancelled_by, requester);
                assert_eq!(e.reason.as_deref(), Some("no longer needed"));
            }
            VmRequestEvent::VmRequestProvisioningStarted(e) => {
                assert_eq!(e.vm_id, vm_id);
                assert_eq!(
                    stored.metadata.occurred_at,
                    time("2026-01-15T09:45:10.250Z"),
                    "sub-second timestamps survive"
                );
                assert_eq!(
                    stored
                        .metadata
                        .causation_id
                        .map(|id| id.to_string())
                        .as_deref(),
                    Some("3f1e0a01-6b2c-4d8e-9a10-000000000002")
                );
            }
            VmRequestEvent::VmRequestReady(e) => {
                assert_eq!(e.vm_id, vm_id);
                assert_eq!(e.vmware_vm_id, VmwareVmId::new("vm-1042"));
                assert_eq!(e.ip_address, Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
                assert_eq!(e.hostname, "web-app01");
                assert_eq!(e.warning_message, None);
                assert_eq!(e.provisioned_at, None, "v1 did not record it");
                assert_eq!(
                    stored.metadata.occurred_at,
                    time("2026-01-15T09:48:41.123456Z")
                );
            }
            VmRequestEvent::VmRequestRetried(e) => {
                assert_eq!(stored.version, 6);
                assert_eq!(e.retried_by, requester);
                assert_eq!(e.failed_vm_id, vm_id);
                assert_eq!(e.attempt, 2);
            }
            VmRequestEvent::VmRequestProvisioningFailed(e) => {
                assert_eq!(e.vm_id, vm_id);
                assert_eq!(e.error_code, "InsufficientResources");
                assert_eq!(e.message, FAILURE_MESSAGE);
                assert!(e.retryable);
            }
            VmRequestEvent::VmRequestWaitingForVcenter(e) => {
                assert_eq!(stored.version, 4);
                assert_eq!(e.since, time("2026-01-15T12:01:07.500Z"));
                assert_eq!(e.error_code, "CircuitOpen");
            }
            VmRequestEvent::VmRequestCustomizingGuest(e) => {
                assert_eq!(stored.version, 4);
                assert_eq!(e.vm_id, vm_id);
            }
            VmRequestEvent::VmRequestVcenterReachable(e) => {
                assert_eq!(stored.version, 5);
                assert_eq!(e.waiting_since, time("2026-01-15T12:01:07.500Z"));
                assert_eq!(stored.metadata.occurred_at, time("2026-01-15T12:13:40Z"));
            }
        }
    }
}

#[test]
fn vm_fixtures_carry_their_values() {
    for name in VM_EVENT_TYPES {
        let (_, stored) = load_fixture(name);
        assert_eq!(stored.stream_id.stream_type, "Vm");
        assert_eq!(stored.stream_id.id, VM);
        let Decoded::Vm(event) = decode(&stored) else {
            unreachable!("VM stream decodes to VM events")
        };
        match event {
            VmEvent::VmProvisioningStarted(e) => {
                assert_eq!(stored.version, 1);
                assert_eq!(e.vm_id, VmId::from_uuid(uuid(VM)));
                assert_eq!(e.request_id, VmRequestId::from_uuid(uuid(REQUEST)));
                assert_eq!(e.tenant_id, TenantId::from_uuid(uuid(TENANT)));
                assert_eq!(e.name.as_str(), "web-app01");
                assert_eq!(e.resources, m_resources());
                assert_eq!(e.folder_path, "acme/web");
            }
            VmEvent::VmProvisioned(e) => {
                assert_eq!(e.vmware_vm_id.as_str(), "vm-1042");
                assert_eq!(e.ip_address, None);
                assert_eq!(e.hostname, "web-app01");
                assert_eq!(e.provisioned_at, time("2026-01-15T09:48:41Z"));
                assert_eq!(
                    e.warning_message.as_deref(),
                    Some(dvmm_core::spec::IP_TIMEOUT_WARNING)
                );
            }
            VmEvent::VmProvisioningFailed(e) => {
                assert_eq!(e.error_code, "InsufficientResources");
                assert_eq!(e.message, FAILURE_MESSAGE);
                assert!(e.retryable);
            }
            VmEvent::VmGuestInfoRefreshed(e) => {
                assert_eq!(e.ip_address, Some("10.1.2.3".parse().expect("ip")));
                assert_eq!(e.hostname.as_deref(), Some("web-app01"));
                assert_eq!(e.power_state, PowerState::PoweredOn);
            }
            VmEvent::VmDeleted(e) => {
                assert_eq!(stored.version, 4);
                assert_eq!(
                    e.reason.as_deref(),
                    Some("removed by the owner after the staging tests")
                );
            }
            VmEvent::VmPartialRemoved(e) => {
                assert_eq!(e.vmware_vm_id, Some(VmwareVmId::new("vm-1042")));
            }
            VmEvent::VmPowerStateObserved(e) => {
                assert_eq!(e.power_state, PowerState::PoweredOff);
            }
        }
    }
}

#[test]
fn request_ready_v2_carries_provisioned_at_and_v1_reads_without_it() {
    let path = v2_fixture_dir().join("VmRequestReady.json");
    let stored: StoredEvent =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("envelope");
    let VmRequestEvent::VmRequestReady(e) = VmRequestEvent::decode(&stored).expect("decodes")
    else {
        panic!("a ready")
    };
    assert_eq!(e.provisioned_at, Some(time("2026-01-15T09:48:41.120Z")));

    let (_, v1) = load_fixture("VmRequestReady");
    let VmRequestEvent::VmRequestReady(e) = VmRequestEvent::decode(&v1).expect("decodes") else {
        panic!("a ready")
    };
    assert_eq!(e.provisioned_at, None);
    assert_eq!(e.vmware_vm_id, VmwareVmId::new("vm-1042"));

    let mut broken = v1.clone();
    broken.payload = json!("not an object");
    assert!(matches!(
        VmRequestEvent::decode(&broken),
        Err(EventDecodeError::Upcast { from: 1, .. })
    ));
}

#[test]
fn optional_fields_left_out_by_an_older_writer_read_as_none() {
    let (_, mut stored) = load_fixture("VmRequestReady");
    let payload = stored.payload.as_object_mut().expect("object payload");
    payload.remove("warning_message");
    payload.remove("ip_address");
    let VmRequestEvent::VmRequestReady(e) = VmRequestEvent::decode(&stored).expect("decodes")
    else {
        panic!("wrong variant")
    };
    assert_eq!((e.ip_address, e.warning_message), (None, None));
}

// ---------------------------------------------------------------------------
// Upcasting: how a later release reads these v1 files.

/// `VmRequestCreated` as a later release might define it: `justification`
/// renamed to `reason`, and a new optional `cost_center`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VmRequestCreatedV2 {
    request_id: VmRequestId,
    tenant_id: TenantId,
    project_id: ProjectId,
    project_prefix: String,
    requested_name: String,
    vm_name: dvmm_core::VmName,
    size: VmSize,
    resources: VmResources,
    requested_by: UserId,
    reason: String,
    cost_center: Option<String>,
}

/// The request events of that later release: v2 of the creation, v1 of the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RequestEventV2 {
    Created(VmRequestCreatedV2),
    Unchanged(VmRequestEvent),
}

impl DomainEvent for RequestEventV2 {
    fn event_type(&self) -> &'static str {
        match self {
            RequestEventV2::Created(_) => "VmRequestCreated",
            RequestEventV2::Unchanged(e) => e.event_type(),
        }
    }

    fn current_version(event_type: &str) -> Option<u32> {
        match event_type {
            "VmRequestCreated" => Some(2),
            other => VmRequestEvent::current_version(other),
        }
    }

    fn to_payload(&self) -> Value {
        match self {
            RequestEventV2::Created(e) => serde_json::to_value(e).expect("serializable"),
            RequestEventV2::Unchanged(e) => e.to_payload(),
        }
    }

    fn from_current_payload(event_type: &str, payload: Value) -> Result<Self, EventDecodeError> {
        match event_type {
            "VmRequestCreated" => serde_json::from_value(payload)
                .map(RequestEventV2::Created)
                .map_err(|source| EventDecodeError::Payload {
                    event_type: event_type.to_owned(),
                    schema_version: 2,
                    source,
                }),
            other => {
                VmRequestEvent::from_current_payload(other, payload).map(RequestEventV2::Unchanged)
            }
        }
    }
}

/// v1 → v2 of `VmRequestCreated`.
fn created_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let fields = payload
        .as_object_mut()
        .ok_or_else(|| "payload is not a JSON object".to_owned())?;
    let justification = fields
        .remove("justification")
        .ok_or_else(|| "v1 payload has no justification".to_owned())?;
    if !justification.is_string() {
        return Err("justification is not a string".into());
    }
    fields.insert("reason".into(), justification);
    fields.insert("cost_center".into(), Value::Null);
    Ok(payload)
}

fn v2_upcasters() -> Upcasters {
    Upcasters::default().with_step("VmRequestCreated", 1, created_v1_to_v2)
}

fn decode_v2(
    stored: &StoredEvent,
    upcasters: &Upcasters,
) -> Result<RequestEventV2, EventDecodeError> {
    RequestEventV2::decode_with(
        &stored.event_type,
        stored.schema_version,
        stored.payload.clone(),
        upcasters,
    )
}

#[test]
fn a_v1_fixture_reads_through_the_v2_shape() {
    let (_, stored) = load_fixture("VmRequestCreated");
    let RequestEventV2::Created(created) = decode_v2(&stored, &v2_upcasters()).expect("upcasts")
    else {
        panic!("VmRequestCreated decodes to the v2 creation")
    };
    assert_eq!(
        created.reason,
        "staging environment for the checkout service"
    );
    assert_eq!(created.cost_center, None);
    assert_eq!(created.vm_name.as_str(), "web-app01");
    assert_eq!(created.request_id.to_string(), REQUEST);
    assert_eq!(created.resources, m_resources());

    // Written again, it is a v2 event that needs no upcaster to read back.
    let new_event = RequestEventV2::Created(created.clone()).to_new_event(stored.metadata.clone());
    assert_eq!(new_event.schema_version, 2);
    assert_eq!(new_event.payload["reason"], json!(created.reason));
    assert!(new_event.payload.get("justification").is_none());
    let back = RequestEventV2::decode_with(
        &new_event.event_type,
        new_event.schema_version,
        new_event.payload,
        &Upcasters::default(),
    )
    .expect("v2 reads without upcasters");
    assert_eq!(back, RequestEventV2::Created(created));

    // Types whose schema did not change pass through untouched.
    let (_, approved) = load_fixture("VmRequestApproved");
    let decoded = decode_v2(&approved, &v2_upcasters()).expect("v1 of an unchanged type");
    let RequestEventV2::Unchanged(VmRequestEvent::VmRequestApproved(e)) = decoded else {
        panic!("approved stays approved: {decoded:?}")
    };
    assert_eq!(e.approved_by.to_string(), APPROVER);
}

#[test]
fn a_newer_schema_version_than_known_is_a_future_version_error() {
    let (_, mut stored) = load_fixture("VmRequestCreated");
    stored.schema_version = 2;
    let err = VmRequestEvent::decode(&stored).expect_err("v2 is unknown to this release");
    assert!(
        matches!(
            &err,
            EventDecodeError::FutureVersion { event_type, found: 2, supported: 1 }
                if event_type == "VmRequestCreated"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("VmRequestCreated"), "{err}");
    stored.schema_version = 3;
    let err = decode_v2(&stored, &v2_upcasters()).expect_err("v3 is unknown to v2");
    assert!(
        matches!(
            err,
            EventDecodeError::FutureVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_missing_upcaster_step_is_reported() {
    let (_, stored) = load_fixture("VmRequestCreated");
    let err = decode_v2(&stored, &Upcasters::default()).expect_err("no step from v1");
    assert!(
        matches!(
            &err,
            EventDecodeError::MissingUpcaster { event_type, from: 1 } if event_type == "VmRequestCreated"
        ),
        "{err:?}"
    );
    // A step registered for another type does not help.
    let wrong = Upcasters::default().with_step("VmRequestApproved", 1, created_v1_to_v2);
    assert!(matches!(
        decode_v2(&stored, &wrong),
        Err(EventDecodeError::MissingUpcaster { from: 1, .. })
    ));
}

#[test]
fn an_upcaster_that_refuses_the_payload_is_an_upcast_error() {
    let (_, mut stored) = load_fixture("VmRequestCreated");
    stored.payload["justification"] = json!(42);
    let err = decode_v2(&stored, &v2_upcasters()).expect_err("the step refuses");
    assert!(
        matches!(&err, EventDecodeError::Upcast { from: 1, reason, .. } if reason.contains("not a string")),
        "{err:?}"
    );
}

#[test]
fn an_unknown_event_type_is_reported_not_guessed() {
    let (_, mut stored) = load_fixture("VmRequestApproved");
    stored.event_type = "VmRequestTeleported".into();
    let err = VmRequestEvent::decode(&stored).expect_err("unknown type");
    assert!(
        matches!(&err, EventDecodeError::UnknownType { event_type } if event_type == "VmRequestTeleported"),
        "{err:?}"
    );
    // A VM event is not a request event, even with a valid payload.
    let (_, vm_event) = load_fixture("VmDeleted");
    assert!(matches!(
        VmRequestEvent::decode(&vm_event),
        Err(EventDecodeError::UnknownType { .. })
    ));
    let (_, request_event) = load_fixture("VmRequestCancelled");
    assert!(matches!(
        VmEvent::decode(&request_event),
        Err(EventDecodeError::UnknownType { .. })
    ));
}

#[test]
fn malformed_payloads_are_payload_errors_not_panics() {
    /// Breaks a payload in place.
    type Corruption = fn(&mut Value);
    let cases: Vec<(&str, Corruption)> = vec![
        ("VmRequestCreated", |p| p["vm_name"] = json!("Web-App01")),
        ("VmRequestCreated", |p| p["vm_name"] = json!("")),
        ("VmRequestCreated", |p| p["size"] = json!("XXL")),
        ("VmRequestCreated", |p| p["resources"]["cpu"] = json!(-1)),
        ("VmRequestCreated", |p| {
            p["request_id"] = json!("not-a-uuid")
        }),
        ("VmRequestCreated", |p| {
            p.as_object_mut().expect("object").remove("tenant_id");
        }),
        ("VmRequestApproved", |p| *p = json!(["approved_by"])),
        ("VmRequestApproved", |p| *p = Value::Null),
        ("VmRequestReady", |p| p["ip_address"] = json!("10.1.2")),
        ("VmRequestProvisioningFailed", |p| {
            p["retryable"] = json!("yes")
        }),
        ("VmProvisioned", |p| {
            p["provisioned_at"] = json!("yesterday")
        }),
        ("VmGuestInfoRefreshed", |p| {
            p["power_state"] = json!("PoweredOn")
        }),
        ("VmProvisioningStarted", |p| p["name"] = json!("web_app01")),
    ];
    for (name, corrupt) in cases {
        let (_, mut stored) = load_fixture(name);
        corrupt(&mut stored.payload);
        let err = if stored.stream_id.stream_type == "Vm" {
            VmEvent::decode(&stored)
                .map(|_| ())
                .expect_err("malformed VM payload")
        } else {
            VmRequestEvent::decode(&stored)
                .map(|_| ())
                .expect_err("malformed request payload")
        };
        // The version named is the one the payload was read as, after
        // upcasting.
        let current = VmRequestEvent::current_version(name)
            .or_else(|| VmEvent::current_version(name))
            .expect("known type");
        assert!(
            matches!(&err, EventDecodeError::Payload { event_type, schema_version, .. } if event_type == name && *schema_version == current),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}
