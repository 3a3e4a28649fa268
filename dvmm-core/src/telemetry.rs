//! The metrics dvmm emits, through the [`metrics`] facade crate: the host
//! installs whatever recorder (exporter) it uses, e.g.
//! `metrics-exporter-prometheus`; without one, recording costs a few
//! atomic loads. Names and labels follow Prometheus conventions; the table
//! is in the README.
//!
//! Tenant ids are not a label unless the host opts in with
//! [`label_by_tenant`]: a label per tenant multiplies every series by the
//! number of tenants.

use std::sync::atomic::{AtomicBool, Ordering};

/// Histogram: one `provision` call (claim, vSphere, recording), seconds, by
/// `outcome` (`ready`, `failed`, `deferred`, `skipped`, `error`).
pub const PROVISIONING_DURATION: &str = "dvmm_provisioning_duration_seconds";
/// Counter: `provision` calls by `outcome` and, for failures and deferrals,
/// `error_code` (the code recorded on the request, e.g. `DuplicateName`).
pub const PROVISIONINGS: &str = "dvmm_provisionings_total";
/// Histogram: one vSphere task or wait inside a provisioning, seconds, by
/// `step` (`CloneVM_Task`, `ReconfigVM_Task`, `CustomizeVM_Task`,
/// `PowerOnVM_Task`, `guest_ip`, …). Emitted by the SOAP client.
pub const PROVISIONING_STEP_DURATION: &str = "dvmm_provisioning_step_duration_seconds";
/// Histogram: one SOAP round trip, seconds, by `method`.
pub const VSPHERE_CALL_DURATION: &str = "dvmm_vsphere_call_duration_seconds";
/// Counter: SOAP calls that failed, by `method` and `fault` (the vim25 fault
/// name, or the client's error code for failures without an answer).
pub const VSPHERE_FAULTS: &str = "dvmm_vsphere_faults_total";
/// Gauge: 1 while the circuit breaker of an `endpoint` (host:port) refuses
/// calls, else 0.
pub const VSPHERE_BREAKER_OPEN: &str = "dvmm_vsphere_breaker_open";
/// Gauge: provisionings (and probes) the runner has under way.
pub const RUNNER_IN_FLIGHT: &str = "dvmm_runner_in_flight";
/// Gauge: jobs the runner has claimed and holds for a free slot or for
/// their vCenter.
pub const RUNNER_HELD: &str = "dvmm_runner_held_jobs";
/// Gauge: vCenter endpoints the runner has parked as unreachable.
pub const RUNNER_PARKED_ENDPOINTS: &str = "dvmm_runner_parked_endpoints";
/// Counter: attempts given back to be retried later.
pub const RUNNER_RETRIES: &str = "dvmm_runner_retries_total";
/// Counter: jobs whose lease the runner lost (another worker took them).
pub const RUNNER_LEASE_LOSSES: &str = "dvmm_runner_lease_losses_total";
/// Counter: jobs given back without an attempt because their vCenter could
/// not be reached (or another caller held the request).
pub const RUNNER_OUTAGE_WAITS: &str = "dvmm_runner_outage_waits_total";
/// Gauge: jobs in the work queue (all workers') by `state`: `queued` (due),
/// `waiting` (put off: a retry's backoff, or an unreachable vCenter),
/// `leased`, `expired` (a lease that ran out: its worker died or hung) and
/// `done` (kept until purged). Read by each runner every
/// `RunnerConfig::queue_depth_interval`.
pub const QUEUE_JOBS: &str = "dvmm_queue_jobs";
/// Counter: feed and claim calls to the store that failed.
pub const RUNNER_STORE_FAILURES: &str = "dvmm_runner_store_failures_total";

static TENANT_LABEL: AtomicBool = AtomicBool::new(false);

/// Adds a `tenant` label (the tenant id) to the provisioning series from
/// now on. Off by default.
pub fn label_by_tenant(on: bool) {
    TENANT_LABEL.store(on, Ordering::Relaxed);
}

/// Whether [`label_by_tenant`] is on.
pub fn tenant_labelled() -> bool {
    TENANT_LABEL.load(Ordering::Relaxed)
}
