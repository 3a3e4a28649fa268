//! The read side shown to users: a request's history as timeline entries.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{EventId, TenantId, VmRequestId};

/// The kind of a timeline entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimelineEntryType {
    /// The request was submitted.
    Created,
    /// The request was approved.
    Approved,
    /// The request was rejected.
    Rejected,
    /// The request was cancelled.
    Cancelled,
    /// Provisioning started.
    ProvisioningStarted,
    /// The VM is ready (with or without its IP).
    VmReady,
    /// Provisioning failed.
    ProvisioningFailed,
    /// Guest facts (e.g. the IP) were refreshed later.
    GuestInfoRefreshed,
    /// vCenter cannot be reached; provisioning waits for it (once per
    /// outage).
    WaitingForVcenter,
    /// vCenter answered again after a wait; provisioning continues.
    VcenterReachable,
    /// What a failed provisioning left on vCenter was removed.
    PartialVmRemoved,
    /// A failed request was sent back through provisioning.
    RetryRequested,
    /// vCenter reported the VM running or stopped (a change of its live
    /// status).
    StatusChanged,
    /// The VM was decommissioned.
    VmDeleted,
    /// The VM is on and its guest applies the customization; the VM is
    /// ready when that finishes.
    CustomizingGuest,
}

impl TimelineEntryType {
    /// Stable name, as stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            TimelineEntryType::Created => "Created",
            TimelineEntryType::Approved => "Approved",
            TimelineEntryType::Rejected => "Rejected",
            TimelineEntryType::Cancelled => "Cancelled",
            TimelineEntryType::ProvisioningStarted => "ProvisioningStarted",
            TimelineEntryType::VmReady => "VmReady",
            TimelineEntryType::ProvisioningFailed => "ProvisioningFailed",
            TimelineEntryType::GuestInfoRefreshed => "GuestInfoRefreshed",
            TimelineEntryType::WaitingForVcenter => "WaitingForVcenter",
            TimelineEntryType::VcenterReachable => "VcenterReachable",
            TimelineEntryType::PartialVmRemoved => "PartialVmRemoved",
            TimelineEntryType::RetryRequested => "RetryRequested",
            TimelineEntryType::StatusChanged => "StatusChanged",
            TimelineEntryType::VmDeleted => "VmDeleted",
            TimelineEntryType::CustomizingGuest => "CustomizingGuest",
        }
    }

    /// Parses [`TimelineEntryType::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Created" => TimelineEntryType::Created,
            "Approved" => TimelineEntryType::Approved,
            "Rejected" => TimelineEntryType::Rejected,
            "Cancelled" => TimelineEntryType::Cancelled,
            "ProvisioningStarted" => TimelineEntryType::ProvisioningStarted,
            "VmReady" => TimelineEntryType::VmReady,
            "ProvisioningFailed" => TimelineEntryType::ProvisioningFailed,
            "GuestInfoRefreshed" => TimelineEntryType::GuestInfoRefreshed,
            "WaitingForVcenter" => TimelineEntryType::WaitingForVcenter,
            "VcenterReachable" => TimelineEntryType::VcenterReachable,
            "PartialVmRemoved" => TimelineEntryType::PartialVmRemoved,
            "RetryRequested" => TimelineEntryType::RetryRequested,
            "StatusChanged" => TimelineEntryType::StatusChanged,
            "VmDeleted" => TimelineEntryType::VmDeleted,
            "CustomizingGuest" => TimelineEntryType::CustomizingGuest,
            _ => return None,
        })
    }
}

impl fmt::Display for TimelineEntryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One line of a request's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// The event this entry was derived from; recording the same entry twice
    /// keeps one.
    pub event_id: EventId,
    /// Tenant.
    pub tenant_id: TenantId,
    /// The request.
    pub request_id: VmRequestId,
    /// Kind.
    pub entry_type: TimelineEntryType,
    /// Human-readable details in English, e.g. `VM ready - IP: 10.1.2.3`.
    pub details: String,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// The facts behind `details`, for a host that renders entries in its
    /// own language or with user names instead of ids.
    #[serde(default)]
    pub fields: TimelineFields,
}

/// The structured facts of a [`TimelineEntry`]; each entry type fills what
/// it has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineFields {
    /// Who acted (requested, approved, rejected, cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<crate::ids::UserId>,
    /// The VM's name (created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// The VM of the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<crate::ids::VmId>,
    /// The guest IP (ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<std::net::IpAddr>,
    /// The machine-readable error code (failed, waiting for vCenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// The reason given or the failure's message (rejected, cancelled,
    /// failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether retrying may help (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Since when (waiting for vCenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
}
