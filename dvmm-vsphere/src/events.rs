//! One `EventHistoryCollector` per session for the guest-customization
//! events of every VM, long-polled by one task while some wait listens, and
//! handed to each waiting VM through a channel.
//!
//! Why one per session rather than one per waiting VM: vcsim 0.24 takes its
//! locks in opposite orders in `DestroyCollector` (the collector, then the
//! `EventManager`) and in every event post (the `EventManager`, then each
//! collector), so destroying a collector while any task, login or
//! `PostEvent` posts an event deadlocks the whole simulator: every later
//! call that posts an event (a power-on, a login) hangs for good. A
//! collector per wait, destroyed after it, hung provisionings at 16 in
//! flight. The shared collector is never destroyed (vCenter destroys it with
//! the session), and one long poll serves every waiting VM, so the cost per
//! VM does not grow with the number in flight.
//!
//! `latestPage` holds only the newest events. When a page shares no event
//! with the one before, events may have scrolled past unseen; every
//! subscriber is then told ([`HubMessage::Lost`]) and reads its VM's
//! history again.
//!
//! The hub also keeps the newest events it took ([`RECENT_EVENTS`]) and
//! hands a new subscriber those about its VM. An outcome often comes in
//! before its VM's wait begins (the guest acts on the power-on as soon as
//! the client does); the hub then takes it while nobody listens for that VM,
//! and the wait has only the VM's history to find it in. A history read can
//! miss it: vcsim's `QueryEvents` searches only its newest 1,000 events of
//! every kind, which a busy simulator posts within a second or two, so the
//! wait ran out with the outcome taken and dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_core::ports::VsphereError;
use tokio::sync::mpsc;

use crate::methods;
use crate::session::Session;
use crate::soap::Node;
use crate::types::MoRef;

/// Events kept on the shared collector's page: a few for each VM waiting at
/// once, so a page rarely scrolls past an event between two polls.
pub const PAGE_SIZE: u32 = 200;

/// Events the hub keeps after handing them on, for a VM whose wait begins
/// after its events came in: a few pages' worth, the newest.
pub const RECENT_EVENTS: usize = 5 * PAGE_SIZE as usize;

/// What a subscriber receives.
#[derive(Debug)]
pub enum HubMessage {
    /// New customization events about the subscriber's VM.
    Events(Vec<Node>),
    /// Events may have been missed: read the VM's history again.
    Lost,
    /// The shared collector failed; the subscription ends.
    Failed(VsphereError),
}

/// The collector and its property wait, kept between runs of the task.
#[derive(Debug)]
struct Watch {
    events: MoRef,
    collector: MoRef,
    version: String,
    /// The newest event key seen on a page.
    last_key: Option<i64>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    subscribers: HashMap<u64, (MoRef, mpsc::UnboundedSender<HubMessage>)>,
    running: bool,
    watch: Option<Watch>,
    /// The newest events taken, oldest first, with the VM each is about.
    recent: std::collections::VecDeque<(MoRef, Node)>,
}

/// The per-session hub (see the module docs).
#[derive(Debug, Default)]
pub struct EventHub {
    inner: Mutex<Inner>,
}

/// A VM's place on the hub; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<EventHub>,
    id: u64,
    rx: mpsc::UnboundedReceiver<HubMessage>,
}

impl Subscription {
    /// The next message; `None` only if the hub went away.
    pub async fn recv(&mut self) -> Option<HubMessage> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.lock().subscribers.remove(&self.id);
    }
}

impl EventHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to the customization events of `vm`, starting the
    /// session's polling task if it is not running. Events posted after
    /// this call are delivered, and so are those among the newest the hub
    /// already took ([`RECENT_EVENTS`]); older ones are the VM's history,
    /// which the caller reads itself ([`methods::query_events`]).
    pub fn subscribe(self: &Arc<Self>, session: &Arc<Session>, vm: &MoRef) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        // Under the same lock as the hand-on in `poll`: an event is either
        // kept already, or handed on after this subscriber is in.
        let taken: Vec<Node> = inner
            .recent
            .iter()
            .filter(|(about, _)| about == vm)
            .map(|(_, event)| event.clone())
            .collect();
        if !taken.is_empty() {
            let _ = tx.send(HubMessage::Events(taken));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subscribers.insert(id, (vm.clone(), tx));
        if !inner.running {
            inner.running = true;
            tokio::spawn(run(self.clone(), session.clone()));
        }
        Subscription {
            hub: self.clone(),
            id,
            rx,
        }
    }

    fn broadcast(&self, message: impl Fn() -> HubMessage) {
        for (_, tx) in self.lock().subscribers.values() {
            let _ = tx.send(message());
        }
    }
}

/// Polls while anyone listens. The session is held only while running, so
/// an idle hub keeps no session alive.
async fn run(hub: Arc<EventHub>, session: Arc<Session>) {
    loop {
        let watch = {
            let mut inner = hub.lock();
            if inner.subscribers.is_empty() {
                inner.running = false;
                return;
            }
            inner.watch.take()
        };
        let watch = match watch {
            Some(w) => Ok(w),
            None => open(&session).await,
        };
        let error = match watch {
            Ok(mut watch) => match poll(&hub, &session, &mut watch).await {
                Ok(()) => {
                    hub.lock().watch = Some(watch);
                    continue;
                }
                Err(e) => {
                    // The property collector may live on after a fault; the
                    // event collector is left to the session (see above).
                    let _ = methods::destroy_property_collector(&session, &watch.collector).await;
                    e
                }
            },
            Err(e) => e,
        };
        // The next collector starts afresh, maybe on a restarted server
        // whose keys and VM references start over too: what was kept may
        // be about other VMs there, and subscribers read history again.
        hub.lock().recent.clear();
        match &error {
            VsphereError::NotFound { kind, .. }
                if kind == "PropertyCollector" || kind == "EventHistoryCollector" =>
            {
                // A re-login took the session's collectors: start afresh,
                // and have subscribers read again what they may have missed.
                hub.broadcast(|| HubMessage::Lost);
            }
            _ => {
                tracing::debug!(error = %error, "customization event collector failed");
                hub.broadcast(|| HubMessage::Failed(error.clone()));
            }
        }
        // Those subscribers fail and leave; a later one starts afresh.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn open(session: &Session) -> Result<Watch, VsphereError> {
    let events = methods::create_event_collector(
        session,
        None,
        methods::CUSTOMIZATION_EVENT_TYPES,
        Some(PAGE_SIZE),
    )
    .await?;
    let collector = methods::create_property_collector(session).await?;
    let watch = Watch {
        events,
        collector,
        version: String::new(),
        last_key: None,
    };
    if let Err(e) =
        methods::create_filter(session, &watch.collector, &watch.events, &["latestPage"]).await
    {
        let _ = methods::destroy_property_collector(session, &watch.collector).await;
        return Err(e);
    }
    Ok(watch)
}

fn key_of(event: &Node) -> Option<i64> {
    event.child_text("key")?.trim().parse().ok()
}

/// The VM an event is about (`vm.vm`).
pub fn vm_of(event: &Node) -> Option<MoRef> {
    event.child("vm")?.child("vm").and_then(MoRef::from_node)
}

async fn poll(hub: &EventHub, session: &Session, watch: &mut Watch) -> Result<(), VsphereError> {
    let seconds = session.options().wait_max_seconds.max(1);
    let updates =
        methods::wait_for_updates(session, &watch.collector, &watch.version, seconds).await?;
    if let Some(version) = updates.version {
        watch.version = version;
    }
    for change in updates.changes {
        if change.obj != watch.events || change.path != "latestPage" {
            continue;
        }
        let page: Vec<Node> = change.val.map(|v| v.children).unwrap_or_default();
        let keys: Vec<i64> = page.iter().filter_map(key_of).collect();
        let (Some(&oldest), Some(&newest)) = (keys.iter().min(), keys.iter().max()) else {
            continue;
        };
        let seen = watch.last_key;
        // A page shorter than vCenter's default size (10) holds every
        // matching event there is, so nothing can have scrolled past.
        let lost = seen.is_some_and(|k| oldest > k) && keys.len() >= 10;
        watch.last_key = Some(seen.map_or(newest, |k| k.max(newest)));
        let mut by_vm: HashMap<MoRef, Vec<Node>> = HashMap::new();
        for event in page {
            // The first page is history: handed on too, since a subscriber
            // may have read its VM's history before this page was taken.
            // Subscribers drop what they already have, by key.
            let new = match (seen, key_of(&event)) {
                (Some(k), Some(key)) => key > k,
                _ => true,
            };
            if new && let Some(vm) = vm_of(&event) {
                by_vm.entry(vm).or_default().push(event);
            }
        }
        let mut inner = hub.lock();
        for (vm, tx) in inner.subscribers.values() {
            if lost {
                let _ = tx.send(HubMessage::Lost);
            }
            if let Some(events) = by_vm.get(vm) {
                let _ = tx.send(HubMessage::Events(events.clone()));
            }
        }
        let mut taken: Vec<(MoRef, Node)> = by_vm
            .into_iter()
            .flat_map(|(vm, events)| events.into_iter().map(move |e| (vm.clone(), e)))
            .collect();
        taken.sort_by_key(|(_, event)| key_of(event));
        inner.recent.extend(taken);
        let excess = inner.recent.len().saturating_sub(RECENT_EVENTS);
        inner.recent.drain(..excess);
    }
    Ok(())
}
