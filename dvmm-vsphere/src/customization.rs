//! Waiting for a VM to be ready after power-on: first vCenter's record of
//! the guest customization (its events), then VMware Tools and an address
//! the guest reported after customization succeeded.
//!
//! The VM's customization events come from two places: its history, read
//! once with `QueryEvents` filtered on the VM itself (so a customization of
//! the template never counts) and, when this call customized the VM, on
//! events from the customization task's start on (so an earlier
//! customization of the same VM does not either); and the session's shared
//! event collector ([`crate::events`]), whose long poll hands on what is
//! posted later. The history makes a wait that resumes after a crash see an
//! outcome posted while nobody was waiting, and the history is read once
//! more when the deadline passes, so an outcome the collector missed is
//! never a timeout. Beside them, one private property collector long-polls
//! the VM's guest properties; when the outcome arrives while that poll is
//! held, `CancelWaitForUpdates` makes it answer at once.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use dvmm_core::ports::VsphereError;
use tokio::time::Instant;

use crate::events::HubMessage;
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

/// Whether a page holds a `CustomizationStartedEvent`.
fn has_start_event(page: &Node) -> bool {
    page.children
        .iter()
        .any(|e| e.xsi_type.as_deref() == Some("CustomizationStartedEvent"))
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

/// How long a cancelled guest poll may take to answer before the cancel is
/// sent again.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

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
    /// Customization was seen to have started.
    start_seen: bool,
    /// The guest properties' first snapshot has been applied.
    snapshot_taken: bool,
    /// A `CustomizationStartedEvent` is among the VM's events.
    start_event: bool,
    /// VMware Tools were seen to stop after customization was seen to
    /// start (the guest restarting into its new identity).
    restarted: bool,
    /// An address was reported after that restart.
    ip_after_restart: bool,
    /// When the success was learned, and when the IP wait that began
    /// with it ends.
    succeeded: Option<(Instant, Instant)>,
}

impl State {
    fn fresh_ip(&self) -> Option<Ipv4Addr> {
        if self.progress != Progress::Succeeded {
            return None;
        }
        self.address_after(self.start_event)
    }

    /// The usable address with tools running, if it can be told to be the
    /// guest's own after customization (`start_event`: vCenter recorded a
    /// `CustomizationStartedEvent`): reported after the success was known, or
    /// different from the address before customization (the guest rebooted
    /// into its new identity and reported before vCenter recorded the
    /// success). Without a start event there is no address from before to
    /// tell apart, and the current one is taken.
    ///
    /// An address first reported after the start, when there was none
    /// before it, is not told apart that way: the guest's report of its
    /// template identity's address may come after vCenter recorded the
    /// start. It counts when reported after the guest restarted (VMware
    /// Tools seen to stop and start again, as customization's reboot does),
    /// and otherwise once it has held for [`SETTLE`] after the success.
    fn address_after(&self, start_event: bool) -> Option<Ipv4Addr> {
        if !self.guest.tools_running() {
            return None;
        }
        let ip = self.guest.usable_ipv4()?;
        let changed = matches!(self.pre_ip, Some(Some(pre)) if pre != ip);
        (self.ip_after_success || !start_event || self.ip_after_restart || changed).then_some(ip)
    }

    /// An address the guest shows that it first reported after
    /// customization was seen to start, with none before it: it may be the
    /// template identity's or the new one.
    fn unsure_ip(&self) -> Option<Ipv4Addr> {
        if self.pre_ip != Some(None) || !self.guest.tools_running() {
            return None;
        }
        self.guest.usable_ipv4()
    }

    /// [`State::unsure_ip`], once customization succeeded.
    fn unsure_address(&self) -> Option<Ipv4Addr> {
        self.unsure_ip()
            .filter(|_| self.progress == Progress::Succeeded)
    }

    /// Sets the deadline after the success: the IP wait's end, or sooner
    /// while the guest shows an address that cannot be told apart, which is
    /// taken if it holds for [`SETTLE`] (the guest reports nothing newer).
    ///
    /// Any address reported after the success counts at once, so the one
    /// shown then either holds or is replaced by one that counts.
    fn settle(&mut self, deadline: &mut Instant, ip_wait: Duration) {
        if self.progress != Progress::Succeeded {
            return;
        }
        let (learned, ip_end) = *self.succeeded.get_or_insert_with(|| {
            let learned = deadline.checked_sub(ip_wait).unwrap_or_else(Instant::now);
            (learned, *deadline)
        });
        *deadline = if self.unsure_address().is_some() {
            ip_end.min(learned + SETTLE)
        } else {
            ip_end
        };
    }
}

/// How long after the success an address that cannot be told to be the
/// guest's own after customization must hold before it is taken: a guest
/// still on its template identity's address reports its new one by then.
pub const SETTLE: Duration = Duration::from_secs(15);

/// Waits for the customization outcome (at most `customization_timeout`
/// after the call), then for an address reported after it (at most
/// `ip_wait` after success).
///
/// `begin_time` (`xsd:dateTime`, the server's clock) leaves out events from
/// before it. A zero `customization_timeout` waits for no outcome: only for
/// VMware Tools and the first usable address (at most `ip_wait`), as for a
/// vCenter that records no customization events.
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
    if customization_timeout.is_zero() {
        return wait_guest_only(session, vm, ip_wait).await;
    }
    let started_at = Instant::now();
    let mut deadline = started_at
        .checked_add(customization_timeout)
        .unwrap_or_else(|| started_at + Duration::from_secs(100 * 365 * 24 * 3600));
    // Subscribed before the history is read, so an event posted in between
    // comes through one or the other (or both: kept once, by key).
    let hub = session.events().subscribe(&session, vm);
    let mut wait = PropertyWait::open(session.clone(), vm.clone(), GUEST_WAIT_PATHS).await?;
    let outcome = async {
        // The guest's state first, then the history: the snapshot is from
        // before every event the history holds (a success in it makes the
        // snapshot's address the one after customization, as for a
        // provisioning resumed after it), and a start in it makes the
        // snapshot's address the one from before customization.
        let snapshot = wait
            .next_changes(customization_timeout.max(ip_wait))
            .await?;
        let mut events = VmEvents::new(begin_time);
        events.add(
            methods::query_events(&session, vm, methods::CUSTOMIZATION_EVENT_TYPES, begin_time)
                .await?,
        );
        watch(
            &session,
            vm,
            begin_time,
            hub,
            &mut events,
            &mut wait,
            &snapshot,
            started_at,
            &mut deadline,
            ip_wait,
        )
        .await
    }
    .await;
    wait.close().await;
    outcome
}

/// The guest wait without the customization outcome: tools running and a
/// usable address, or no address once `ip_wait` has passed.
async fn wait_guest_only(
    session: Arc<Session>,
    vm: &MoRef,
    ip_wait: Duration,
) -> Result<Ready, VsphereError> {
    let mut guest = GuestInfo::default();
    let up = crate::wait::wait_until(
        session,
        vm.clone(),
        GUEST_WAIT_PATHS,
        ip_wait,
        &mut guest,
        |g, path, val| g.apply(path, val),
        |g| g.tools_running() && g.usable_ipv4().is_some(),
    )
    .await?;
    Ok(Ready {
        ip: up.then(|| guest.usable_ipv4()).flatten(),
        host_name: guest.host_name,
    })
}

/// The VM's customization events seen so far, once each.
#[derive(Debug)]
struct VmEvents {
    begin: Option<chrono::DateTime<chrono::FixedOffset>>,
    keys: std::collections::HashSet<i64>,
    page: Node,
}

impl VmEvents {
    fn new(begin_time: Option<&str>) -> Self {
        Self {
            begin: begin_time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok()),
            keys: Default::default(),
            page: Node::new("val"),
        }
    }

    /// Adds events; whether any was new.
    fn add(&mut self, events: Vec<Node>) -> bool {
        let mut added = false;
        for event in events {
            // The shared collector has no time filter: apply the server's
            // (events created before this customization are an earlier one's).
            let created = event
                .child_text("createdTime")
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok());
            if let (Some(begin), Some(created)) = (self.begin, created)
                && created < begin
            {
                continue;
            }
            let key = event
                .child_text("key")
                .and_then(|k| k.trim().parse::<i64>().ok());
            if key.is_some_and(|k| !self.keys.insert(k)) {
                continue;
            }
            self.page.children.push(event);
            added = true;
        }
        added
    }
}

/// Applies what the VM's events tell; a failure ends the wait.
fn apply_events(
    state: &mut State,
    events: &VmEvents,
    deadline: &mut Instant,
    ip_wait: Duration,
) -> Result<(), VsphereError> {
    let Some((progress, started)) = progress_of_page(&events.page) else {
        return Ok(());
    };
    if started && !state.start_seen {
        // The address before customization: the one when it was seen to
        // start. Not when the outcome came with the start (the guest's
        // report of its new address may have come in before them both),
        // nor for a start already in the history: the first snapshot's
        // then.
        state.start_seen = true;
        if state.snapshot_taken && progress == Progress::Started {
            state.pre_ip = Some(state.guest.usable_ipv4());
        }
    }
    state.started |= started;
    state.start_event |= has_start_event(&events.page);
    let succeeded_before = state.progress == Progress::Succeeded;
    state.progress = progress;
    match &state.progress {
        Progress::Failed { event, reason } => Err(VsphereError::CustomizationFailed {
            event: event.clone(),
            reason: reason.clone(),
        }),
        Progress::Succeeded if !succeeded_before => {
            tracing::info!("guest customization succeeded");
            *deadline = Instant::now() + ip_wait;
            Ok(())
        }
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    session: &Arc<Session>,
    vm: &MoRef,
    begin_time: Option<&str>,
    mut hub: crate::events::Subscription,
    events: &mut VmEvents,
    wait: &mut PropertyWait,
    snapshot: &[methods::Change],
    started_at: Instant,
    deadline: &mut Instant,
    ip_wait: Duration,
) -> Result<Ready, VsphereError> {
    let mut state = State::default();
    // The VM's history was read once more before the wait was given up.
    let mut looked_again = false;
    let ip_reported = apply_guest(&mut state, snapshot);
    state.snapshot_taken = true;
    state.pre_ip = Some(state.guest.usable_ipv4());
    // The history may hold the outcome already.
    apply_events(&mut state, events, deadline, ip_wait)?;
    if state.progress == Progress::Succeeded {
        state.ip_after_success |= ip_reported;
    }
    loop {
        if let Some(ip) = state.fresh_ip() {
            return Ok(Ready {
                ip: Some(ip),
                host_name: state.guest.host_name.clone(),
            });
        }
        state.settle(deadline, ip_wait);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Whatever way the session's collector may have missed the
            // outcome (an answer lost on the way and its changes with it,
            // events that scrolled past unnoticed), the wait does not end
            // while vCenter's history holds it: one more read, at the end
            // only, so it costs nothing while the collector keeps up.
            if !looked_again && state.progress != Progress::Succeeded {
                looked_again = true;
                let history = methods::query_events(
                    session,
                    vm,
                    methods::CUSTOMIZATION_EVENT_TYPES,
                    begin_time,
                )
                .await?;
                if events.add(history) {
                    apply_events(&mut state, events, deadline, ip_wait)?;
                    if state.progress == Progress::Succeeded {
                        tracing::info!(
                            "customization outcome found in the history at the deadline"
                        );
                        continue;
                    }
                }
            }
            return timed_out(&state, started_at);
        }
        let collector = wait.collector().cloned();
        let outcome_known = state.progress == Progress::Succeeded;
        let mut events_changed = false;
        // Customization was seen to start while the guest poll was held:
        // the guest was brought up to now before judging.
        let mut synced = false;
        // The success was learned while the guest poll was held, which goes
        // on: what it brings counts as reported in or after the success.
        let mut success_in_poll: Option<Instant> = None;
        let state_now = &state;
        let poll = wait.next_changes(left);
        // The customization deadline bounds the wait for the outcome only:
        // once the success is known, the IP wait takes over, and a deadline
        // passing meanwhile must not drop the success learned.
        let expiry = tokio::time::sleep(left + Duration::from_millis(50));
        // `Ok(None)`: the deadline passed.
        let next: Result<Option<Vec<methods::Change>>, VsphereError> = async {
            tokio::pin!(poll);
            tokio::pin!(expiry);
            let mut listening = !outcome_known;
            loop {
                tokio::select! {
                    biased;
                    changes = &mut poll => return changes.map(Some),
                    () = &mut expiry => return Ok(None),
                    message = hub.recv(), if listening => {
                        let fresh = match message {
                            Some(HubMessage::Events(list)) => events.add(list),
                            Some(HubMessage::Lost) => events.add(
                                methods::query_events(
                                    session,
                                    vm,
                                    methods::CUSTOMIZATION_EVENT_TYPES,
                                    begin_time,
                                )
                                .await?,
                            ),
                            Some(HubMessage::Failed(e)) => return Err(e),
                            // Cannot happen while subscribed; stop listening.
                            None => {
                                listening = false;
                                false
                            }
                        };
                        events_changed |= fresh;
                        if !fresh {
                            continue;
                        }
                        match progress_of_page(&events.page) {
                            // A failure needs no guest state.
                            Some((Progress::Failed { .. }, _)) => return Ok(Some(Vec::new())),
                            // An address that is the guest's own after
                            // customization is the answer; otherwise the
                            // held poll brings the next report, which is.
                            Some((Progress::Succeeded, _)) => {
                                if state_now.address_after(has_start_event(&events.page)).is_some() {
                                    return Ok(Some(Vec::new()));
                                }
                                // The IP wait starts now: the held poll
                                // may last longer, but not past the time an
                                // address shown now is taken anyway.
                                success_in_poll = Some(Instant::now());
                                let unsure = state_now.unsure_ip().is_some();
                                let hold = if unsure { ip_wait.min(SETTLE) } else { ip_wait };
                                return match tokio::time::timeout(hold, &mut poll).await {
                                    Ok(changes) => changes.map(Some),
                                    Err(_) => Ok(Some(Vec::new())),
                                };
                            }
                            _ => break,
                        }
                    }
                }
            }
            // Started: the address before customization is the one the
            // guest has now, and the held poll may wait for minutes. Ask the
            // server to answer now and take what it has (dropping the call
            // instead could lose changes the server already took off the
            // collector). A cancel that reaches the server before the poll
            // does cancels nothing, so it is sent again until the poll
            // answers.
            synced = true;
            let Some(collector) = &collector else {
                return tokio::select! {
                    changes = &mut poll => changes.map(Some),
                    () = &mut expiry => Ok(None),
                };
            };
            loop {
                methods::cancel_wait_for_updates(session, collector).await?;
                tokio::select! {
                    changes = &mut poll => return changes.map(Some),
                    () = &mut expiry => return Ok(None),
                    () = tokio::time::sleep(CANCEL_GRACE) => {}
                }
            }
        }
        .await;
        let changes = match next {
            Err(e) => return Err(e),
            Ok(Some(changes)) => changes,
            Ok(None) => {
                // Judged at the top of the loop, with what came meanwhile.
                if events_changed {
                    apply_events(&mut state, events, deadline, ip_wait)?;
                }
                continue;
            }
        };
        let succeeded_before = state.progress == Progress::Succeeded;
        let mut ip_reported = apply_guest(&mut state, &changes);
        if synced {
            // A cancelled poll may leave changes on the server (vcsim's);
            // take every one it already has. A zero wait answers at once.
            ip_reported |= apply_guest(&mut state, &wait.next_changes(Duration::ZERO).await?);
        }
        // Until a start is seen live, the address before customization is
        // the one the wait began with (its first snapshot).
        if !state.snapshot_taken {
            state.snapshot_taken = true;
            state.pre_ip = Some(state.guest.usable_ipv4());
        }
        if events_changed {
            apply_events(&mut state, events, deadline, ip_wait)?;
        }
        if let Some(learned) = success_in_poll {
            *deadline = learned + ip_wait;
        }
        if succeeded_before || success_in_poll.is_some() {
            state.ip_after_success |= ip_reported;
        }
        if let Some(ip) = state.fresh_ip() {
            return Ok(Ready {
                ip: Some(ip),
                host_name: state.guest.host_name.clone(),
            });
        }
    }
}

/// Applies a batch of guest changes; whether it reported an address.
fn apply_guest(state: &mut State, changes: &[methods::Change]) -> bool {
    let mut ip_reported = false;
    for change in changes {
        let was_running = state.guest.tools_running();
        state.guest.apply(&change.path, change.val.as_ref());
        if state.start_seen && was_running && !state.guest.tools_running() {
            state.restarted = true;
        }
        let ip = matches!(
            change.path.as_str(),
            "guest.ipAddress" | "guest.net" | "guest"
        );
        ip_reported |= ip;
        state.ip_after_restart |= ip && state.restarted;
    }
    ip_reported
}

fn timed_out(state: &State, started_at: Instant) -> Result<Ready, VsphereError> {
    if state.progress == Progress::Succeeded {
        let held = state.unsure_address();
        match held {
            Some(ip) => {
                tracing::info!(%ip, "taking the address the guest kept after customization")
            }
            None => tracing::warn!("no guest IP in time after customization"),
        }
        return Ok(Ready {
            ip: held,
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
