//! Waiting for a VM to be ready after power-on: first vCenter's record of
//! the guest customization (its events), then VMware Tools and an address
//! the guest reported after customization succeeded.
//!
//! One private property collector with one filter watches both the VM's
//! guest properties and the `latestPage` of an `EventHistoryCollector` of the
//! VM's customization events, long-polled through `WaitForUpdatesEx`. The
//! event collector is filtered on the VM itself (so a customization of the
//! template never counts) and, when this call customized the VM, on events
//! created from the customization task's start on (so an earlier
//! customization of the same VM does not either). Its first page holds what
//! already happened, so a wait that resumes after a crash sees an outcome
//! posted while nobody was waiting.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use dvmm_core::ports::VsphereError;
use tokio::time::Instant;

use crate::methods;
use crate::session::Session;
use crate::soap::Node;
use crate::types::{GuestInfo, MoRef};
use crate::wait::PropertyWait;

/// The guest properties watched while waiting.
pub const GUEST_WAIT_PATHS: &[&str] = &[
    "guest.toolsRunningStatus",
    "guest.ipAddress",
    "guest.net",
    "guest.hostName",
];

/// What vCenter recorded last about the VM's customization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// Nothing yet.
    #[default]
    NotStarted,
    /// `CustomizationStartedEvent`.
    Started,
    /// `CustomizationSucceeded`.
    Succeeded,
    /// A `CustomizationFailed` (or subtype) with vCenter's reason, if any.
    Failed {
        /// The event type.
        event: String,
        /// `reason`, else the event's message.
        reason: Option<String>,
    },
}

/// Reads a `latestPage` value (an `ArrayOfEvent`): the customization state
/// the newest customization event on it tells, with whether any of them
/// said customization started. `None` when the page has no customization
/// event.
pub fn progress_of_page(page: &Node) -> Option<(Progress, bool)> {
    let mut newest: Option<(i64, Progress)> = None;
    let mut started = false;
    for event in &page.children {
        let Some(kind) = event.xsi_type.as_ref().map(|t| t.as_str().to_owned()) else {
            continue;
        };
        let key = event
            .child_text("key")
            .and_then(|k| k.trim().parse::<i64>().ok())
            .unwrap_or(i64::MIN);
        let progress = match kind.as_str() {
            "CustomizationStartedEvent" => Progress::Started,
            "CustomizationSucceeded" => Progress::Succeeded,
            k if methods::CUSTOMIZATION_EVENT_TYPES.contains(&k) => {
                let text = |name: &str| {
                    event
                        .child_text(name)
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                };
                Progress::Failed {
                    event: kind.clone(),
                    reason: text("reason").or_else(|| text("fullFormattedMessage")),
                }
            }
            _ => continue,
        };
        started = true;
        if newest.as_ref().is_none_or(|(k, _)| key >= *k) {
            newest = Some((key, progress));
        }
    }
    newest.map(|(_, p)| (p, started))
}

/// How a successful wait ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The usable IPv4 address reported after customization succeeded;
    /// `None` when none came within the IP wait.
    pub ip: Option<Ipv4Addr>,
    /// `guest.hostName` as the guest reported it.
    pub host_name: Option<String>,
}

/// The state built from the collector's changes.
#[derive(Debug, Default)]
struct State {
    guest: GuestInfo,
    progress: Progress,
    started: bool,
    /// The usable address when customization was first seen started (the
    /// template identity's, from before customization reboots the guest).
    pre_ip: Option<Option<Ipv4Addr>>,
    /// An address was reported in or after the batch that brought success.
    ip_after_success: bool,
    /// `pre_ip` was taken when customization was seen to start.
    start_seen: bool,
}

impl State {
    fn fresh_ip(&self) -> Option<Ipv4Addr> {
        if self.progress != Progress::Succeeded || !self.guest.tools_running() {
            return None;
        }
        let ip = self.guest.usable_ipv4()?;
        // Either reported after success, or a new address since
        // customization started (the guest rebooted into its new identity
        // and reported before vCenter recorded the success).
        (self.ip_after_success || self.pre_ip.is_some_and(|pre| pre != Some(ip))).then_some(ip)
    }
}

/// Waits for the customization outcome (at most `customization_timeout`
/// after the call), then for an address reported after it (at most
/// `ip_wait` after success).
///
/// `begin_time` (`xsd:dateTime`, the server's clock) leaves out events from
/// before it.
///
/// # Errors
/// [`VsphereError::CustomizationFailed`], [`VsphereError::CustomizationTimeout`],
/// faults and transport errors.
pub async fn wait_ready(
    session: Arc<Session>,
    vm: &MoRef,
    begin_time: Option<&str>,
    customization_timeout: Duration,
    ip_wait: Duration,
) -> Result<Ready, VsphereError> {
    let events = methods::create_event_collector(
        &session,
        vm,
        methods::CUSTOMIZATION_EVENT_TYPES,
        begin_time,
    )
    .await?;
    let outcome = watch(session.clone(), vm, &events, customization_timeout, ip_wait).await;
    if let Err(e) = methods::destroy_collector(&session, &events).await {
        tracing::debug!(error = %e, "could not destroy an event collector");
    }
    outcome
}

async fn watch(
    session: Arc<Session>,
    vm: &MoRef,
    events: &MoRef,
    customization_timeout: Duration,
    ip_wait: Duration,
) -> Result<Ready, VsphereError> {
    let started_at = Instant::now();
    let mut deadline = started_at + customization_timeout;
    let mut wait = PropertyWait::open_many(
        session,
        vec![
            (vm.clone(), GUEST_WAIT_PATHS.to_vec()),
            (events.clone(), vec!["latestPage"]),
        ],
    )
    .await?;
    let mut state = State::default();
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break timed_out(&state, started_at);
        }
        let next =
            tokio::time::timeout(left + Duration::from_millis(50), wait.next_changes(left)).await;
        let changes = match next {
            Err(_) => break timed_out(&state, started_at),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(changes)) => changes,
        };
        let succeeded_before = state.progress == Progress::Succeeded;
        let ip_before = state.guest.usable_ipv4();
        let mut ip_reported = false;
        for change in &changes {
            if change.obj == *events {
                if let Some((progress, started)) = change.val.as_ref().and_then(progress_of_page) {
                    state.started |= started;
                    state.progress = progress;
                }
            } else {
                state.guest.apply(&change.path, change.val.as_ref());
                ip_reported |= matches!(
                    change.path.as_str(),
                    "guest.ipAddress" | "guest.net" | "guest"
                );
            }
        }
        // The address before customization: the one when it was seen to
        // start, else (no start event seen) the one the wait began with.
        if state.started && !state.start_seen {
            state.start_seen = true;
            state.pre_ip = Some(ip_before);
        } else if state.pre_ip.is_none() {
            state.pre_ip = Some(ip_before);
        }
        match &state.progress {
            Progress::Failed { event, reason } => {
                break Err(VsphereError::CustomizationFailed {
                    event: event.clone(),
                    reason: reason.clone(),
                });
            }
            Progress::Succeeded => {
                if !succeeded_before {
                    tracing::info!("guest customization succeeded");
                    deadline = Instant::now() + ip_wait;
                }
                if ip_reported {
                    state.ip_after_success = true;
                }
                if let Some(ip) = state.fresh_ip() {
                    break Ok(Ready {
                        ip: Some(ip),
                        host_name: state.guest.host_name.clone(),
                    });
                }
            }
            Progress::NotStarted | Progress::Started => {}
        }
    };
    wait.close().await;
    outcome
}

fn timed_out(state: &State, started_at: Instant) -> Result<Ready, VsphereError> {
    if state.progress == Progress::Succeeded {
        tracing::warn!("no guest IP in time after customization");
        return Ok(Ready {
            ip: None,
            host_name: state.guest.host_name.clone(),
        });
    }
    Err(VsphereError::CustomizationTimeout {
        started: state.started,
        waited_secs: started_at.elapsed().as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, key: &str, reason: Option<&str>) -> Node {
        let mut e = Node::new("Event");
        e.xsi_type = Some(kind.into());
        e.children.push(Node::with_text("key", key));
        if let Some(r) = reason {
            e.children.push(Node::with_text("reason", r));
        }
        e
    }

    #[test]
    fn the_newest_customization_event_decides() {
        let mut page = Node::new("val");
        page.children
            .push(event("CustomizationSucceeded", "9", None));
        page.children
            .push(event("CustomizationStartedEvent", "7", None));
        page.children.push(event("VmPoweredOnEvent", "11", None));
        assert_eq!(progress_of_page(&page), Some((Progress::Succeeded, true)));
        page.children.push(event(
            "CustomizationLinuxIdentityFailed",
            "12",
            Some("no perl"),
        ));
        assert_eq!(
            progress_of_page(&page),
            Some((
                Progress::Failed {
                    event: "CustomizationLinuxIdentityFailed".into(),
                    reason: Some("no perl".into())
                },
                true
            ))
        );
        assert_eq!(progress_of_page(&Node::new("val")), None);
    }
}
