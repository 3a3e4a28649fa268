//! Loading, deciding and appending: the one place that turns a command into
//! stored events, with the optimistic-concurrency retry (what esrs calls the
//! aggregate manager), for every command of the service.

use tracing::debug;

use crate::aggregate::Aggregate;
use crate::clock::{Clock, IdGenerator};
use crate::error::DomainError;
use crate::event::{DomainEvent, EventMetadata, NewEvent, StreamId};
use crate::ids::{CorrelationId, EventId, TenantId, UserId, VmId, VmRequestId};
use crate::ports::{EventStore, TimelineSink, VspherePort};
use crate::vm::Vm;
use crate::vm_request::VmRequest;

use super::{ProvisioningService, ServiceError};

/// How often a command is retried after optimistic-concurrency conflicts
/// before giving up with [`ServiceError::TooManyConflicts`].
pub(super) const MAX_CONFLICT_RETRIES: usize = 16;

/// An aggregate as read from its stream: its state, the version the next
/// append expects, and the events (for the timeline to catch up on).
pub(super) struct Loaded<A: Aggregate> {
    pub(super) state: Option<A>,
    pub(super) version: u64,
    pub(super) last_event_id: Option<EventId>,
    pub(super) events: Vec<(EventMetadata, A::Event)>,
}

/// Events a command appended, with the whole stream they end and the state
/// it leads to: a projection (the request read model) needs the stream, and
/// reading it back from the store would cost a load per command. Derefs to
/// the appended events.
pub(super) struct Written<A: Aggregate> {
    /// The events appended (none when the command changed nothing).
    pub(super) events: Vec<(EventMetadata, A::Event)>,
    /// The stream as it stands after them, from its first event.
    pub(super) stream: Vec<(EventMetadata, A::Event)>,
    /// The state `stream` leads to.
    pub(super) state: Option<A>,
}

impl<A: Aggregate> Written<A> {
    /// Nothing was appended (another caller recorded it first).
    pub(super) fn nothing() -> Self {
        Self {
            events: Vec::new(),
            stream: Vec::new(),
            state: None,
        }
    }
}

impl<A: Aggregate> std::ops::Deref for Written<A> {
    type Target = [(EventMetadata, A::Event)];

    fn deref(&self) -> &Self::Target {
        &self.events
    }
}

impl<'a, A: Aggregate> IntoIterator for &'a Written<A> {
    type Item = &'a (EventMetadata, A::Event);
    type IntoIter = std::slice::Iter<'a, (EventMetadata, A::Event)>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter()
    }
}

/// Who acts and as part of which user action.
#[derive(Clone, Copy)]
pub(super) struct Actor {
    pub(super) tenant: TenantId,
    pub(super) user: UserId,
    pub(super) correlation: CorrelationId,
}

impl<S, V, T, C, I> ProvisioningService<S, V, T, C, I>
where
    S: EventStore,
    V: VspherePort,
    T: TimelineSink,
    C: Clock,
    I: IdGenerator,
{
    pub(super) fn metadata(&self, actor: Actor, causation: Option<EventId>) -> EventMetadata {
        EventMetadata {
            event_id: EventId::from_uuid(self.ids.new_uuid()),
            tenant_id: actor.tenant,
            user_id: actor.user,
            correlation_id: actor.correlation,
            causation_id: causation,
            occurred_at: self.clock.now(),
        }
    }

    pub(super) fn actor(&self, tenant: TenantId, user: UserId) -> Actor {
        Actor {
            tenant,
            user,
            correlation: CorrelationId::from_uuid(self.ids.new_uuid()),
        }
    }

    pub(super) async fn load<A>(
        &self,
        tenant: TenantId,
        stream: &StreamId,
    ) -> Result<Loaded<A>, ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent,
    {
        let stored = self.store.load(tenant, stream).await?;
        let mut events = Vec::with_capacity(stored.len());
        let mut state = None;
        for event in &stored {
            let decoded = A::Event::decode(event)?;
            state = A::apply(state, &decoded);
            events.push((event.metadata.clone(), decoded));
        }
        Ok(Loaded {
            state,
            version: stored.last().map_or(0, |e| e.version),
            last_event_id: stored.last().map(|e| e.metadata.event_id),
            events,
        })
    }

    /// Appends events decided on `loaded`. `Ok(None)` means a conflict: the
    /// caller reloads and decides again.
    pub(super) async fn append<A>(
        &self,
        actor: Actor,
        stream: &StreamId,
        loaded: &Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Option<Written<A>>, ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent + Clone,
    {
        let mut causation = loaded.last_event_id;
        let mut written = Vec::with_capacity(events.len());
        let mut envelopes: Vec<NewEvent> = Vec::with_capacity(events.len());
        for event in events {
            let metadata = self.metadata(actor, causation);
            causation = Some(metadata.event_id);
            envelopes.push(event.to_new_event(metadata.clone()));
            written.push((metadata, event));
        }
        match self
            .store
            .append(actor.tenant, stream, loaded.version, envelopes)
            .await
        {
            Ok(_) => {
                let state = written
                    .iter()
                    .fold(loaded.state.clone(), |s, (_, e)| A::apply(s, e));
                let mut stream = Vec::with_capacity(loaded.events.len() + written.len());
                stream.extend(loaded.events.iter().cloned());
                stream.extend(written.iter().cloned());
                Ok(Some(Written {
                    events: written,
                    stream,
                    state,
                }))
            }
            Err(e) if e.is_conflict() => {
                debug!(%stream, "concurrent modification; reloading");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `command` against an aggregate with conflict retries. Returns the
    /// state after the command and the events it wrote.
    pub(super) async fn execute<A>(
        &self,
        actor: Actor,
        stream: &StreamId,
        command: &A::Command,
    ) -> Result<(A, Written<A>), ServiceError>
    where
        A: Aggregate,
        A::Event: DomainEvent + Clone,
    {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let loaded = self.load::<A>(actor.tenant, stream).await?;
            let events = A::handle(loaded.state.as_ref(), command)?;
            if let Some(written) = self.append(actor, stream, &loaded, events).await? {
                let state = written.state.clone().ok_or(DomainError::NotFound {
                    aggregate: A::STREAM_TYPE,
                })?;
                return Ok((state, written));
            }
        }
        Err(ServiceError::TooManyConflicts {
            stream: stream.clone(),
        })
    }
}

/// The stream of a request.
pub fn request_stream(id: VmRequestId) -> StreamId {
    StreamId::new(VmRequest::STREAM_TYPE, id)
}

/// The stream of a VM.
pub fn vm_stream(id: VmId) -> StreamId {
    StreamId::new(Vm::STREAM_TYPE, id)
}
