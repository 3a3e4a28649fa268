//! Event metadata and the serialized envelopes that stores persist.
//!
//! Stores never see domain types: they keep [`NewEvent`]s (type name, schema
//! version, JSON payload, metadata) and hand back [`StoredEvent`]s. Domain
//! event enums implement [`DomainEvent`] to go to and from that form; an
//! [`Upcasters`] chain lifts payloads written by older schema versions.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{CorrelationId, EventId, TenantId, UserId};

/// Who caused an event, when, and as part of which user action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Unique event id.
    pub event_id: EventId,
    /// Tenant the event belongs to.
    pub tenant_id: TenantId,
    /// User on whose behalf it happened.
    pub user_id: UserId,
    /// The user action this event is part of.
    pub correlation_id: CorrelationId,
    /// The event that caused this one, if any.
    pub causation_id: Option<EventId>,
    /// When it happened, from the [`crate::clock::Clock`] port.
    pub occurred_at: DateTime<Utc>,
}

/// A stream's identity: its type (`VmRequest`, `Vm`) and id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamId {
    /// Aggregate type, e.g. `VmRequest`.
    pub stream_type: String,
    /// Aggregate id (a UUID string).
    pub id: String,
}

impl StreamId {
    /// A stream id.
    pub fn new(stream_type: impl Into<String>, id: impl fmt::Display) -> Self {
        Self {
            stream_type: stream_type.into(),
            id: id.to_string(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.stream_type, self.id)
    }
}

/// An event ready to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Stable type name, e.g. `VmRequestApproved`.
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: u32,
    /// The event as JSON.
    pub payload: Value,
    /// Metadata (carries the event id).
    pub metadata: EventMetadata,
}

/// An event as a store returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Global position across all streams (starts at 1, strictly increasing).
    pub position: u64,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Version within the stream (the first event is version 1).
    pub version: u64,
    /// Stable type name.
    pub event_type: String,
    /// Schema version of `payload` as written.
    pub schema_version: u32,
    /// The event as JSON.
    pub payload: Value,
    /// Metadata.
    pub metadata: EventMetadata,
}

/// A stored event could not be turned back into a domain event.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    /// No event of this type exists in this release.
    #[error("unknown event type {event_type:?}")]
    UnknownType {
        /// The stored type name.
        event_type: String,
    },
    /// Stored with a schema version newer than this release understands.
    #[error(
        "event {event_type} has schema version {found}, newer than the {supported} this release reads"
    )]
    FutureVersion {
        /// Type name.
        event_type: String,
        /// Stored version.
        found: u32,
        /// Newest version known here.
        supported: u32,
    },
    /// No upcaster lifts this old version.
    #[error("no upcaster for event {event_type} from schema version {from}")]
    MissingUpcaster {
        /// Type name.
        event_type: String,
        /// Version that could not be lifted.
        from: u32,
    },
    /// The payload does not match the type's schema.
    #[error("event {event_type} v{schema_version} has a malformed payload: {source}")]
    Payload {
        /// Type name.
        event_type: String,
        /// Version.
        schema_version: u32,
        /// JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster rejected the payload.
    #[error("upcasting {event_type} from v{from} failed: {reason}")]
    Upcast {
        /// Type name.
        event_type: String,
        /// Version it was lifted from.
        from: u32,
        /// Why.
        reason: String,
    },
}

/// A domain event enum that has a stable serialized form.
pub trait DomainEvent: Sized {
    /// The stable type name of this event.
    fn event_type(&self) -> &'static str;

    /// The current schema version of `event_type`.
    fn current_version(event_type: &str) -> Option<u32>;

    /// The payload in the current schema.
    fn to_payload(&self) -> Value;

    /// Decodes a payload in the current schema version.
    ///
    /// # Errors
    /// [`EventDecodeError::UnknownType`] or [`EventDecodeError::Payload`].
    fn from_current_payload(event_type: &str, payload: Value) -> Result<Self, EventDecodeError>;

    /// Decodes a stored event, lifting old schema versions with `upcasters`.
    ///
    /// # Errors
    /// An [`EventDecodeError`] saying why the event cannot be read.
    fn decode_with(
        event_type: &str,
        schema_version: u32,
        payload: Value,
        upcasters: &Upcasters,
    ) -> Result<Self, EventDecodeError> {
        let current =
            Self::current_version(event_type).ok_or_else(|| EventDecodeError::UnknownType {
                event_type: event_type.to_owned(),
            })?;
        let payload = upcasters.lift(event_type, schema_version, current, payload)?;
        Self::from_current_payload(event_type, payload)
    }

    /// Decodes a stored event with the release's built-in upcasters
    /// ([`Upcasters::builtin`]).
    ///
    /// # Errors
    /// An [`EventDecodeError`] saying why the event cannot be read.
    fn decode(stored: &StoredEvent) -> Result<Self, EventDecodeError> {
        Self::decode_with(
            &stored.event_type,
            stored.schema_version,
            stored.payload.clone(),
            &BUILTIN_UPCASTERS,
        )
    }

    /// Wraps the event for appending.
    fn to_new_event(&self, metadata: EventMetadata) -> NewEvent {
        let event_type = self.event_type();
        NewEvent {
            event_type: event_type.to_owned(),
            schema_version: Self::current_version(event_type).unwrap_or(1),
            payload: self.to_payload(),
            metadata,
        }
    }
}

/// Lifts a payload from one schema version to the next.
pub type UpcastFn = fn(Value) -> Result<Value, String>;

/// The chain of upcasters: for each (event type, version) a function that
/// lifts the payload to version + 1. Every release keeps the steps it needs
/// so that events written by any earlier release still load.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), UpcastFn>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters")
            .field("steps", &self.steps.keys().collect::<Vec<_>>())
            .finish()
    }
}

static BUILTIN_UPCASTERS: LazyLock<Upcasters> = LazyLock::new(Upcasters::builtin);

impl Upcasters {
    /// Every step this release needs to read the events of earlier ones:
    ///
    /// - `VmProvisioningStarted` v1 → v2: no recorded placement.
    /// - `VmRequestReady` v1 → v2: no recorded `provisioned_at`.
    pub fn builtin() -> Self {
        Self::default()
            .with_step(
                "VmProvisioningStarted",
                1,
                crate::vm::upcast_provisioning_started_v1,
            )
            .with_step("VmRequestReady", 1, crate::vm_request::upcast_ready_v1)
    }

    /// Registers the step that lifts `event_type` from `from` to `from + 1`.
    pub fn with_step(mut self, event_type: &str, from: u32, step: UpcastFn) -> Self {
        self.steps.insert((event_type.to_owned(), from), step);
        self
    }

    /// Lifts `payload` from `found` to `target`.
    ///
    /// # Errors
    /// [`EventDecodeError::FutureVersion`], [`EventDecodeError::MissingUpcaster`]
    /// or [`EventDecodeError::Upcast`].
    pub fn lift(
        &self,
        event_type: &str,
        found: u32,
        target: u32,
        mut payload: Value,
    ) -> Result<Value, EventDecodeError> {
        if found > target {
            return Err(EventDecodeError::FutureVersion {
                event_type: event_type.to_owned(),
                found,
                supported: target,
            });
        }
        for from in found..target {
            let step = self
                .steps
                .get(&(event_type.to_owned(), from))
                .ok_or_else(|| EventDecodeError::MissingUpcaster {
                    event_type: event_type.to_owned(),
                    from,
                })?;
            payload = step(payload).map_err(|reason| EventDecodeError::Upcast {
                event_type: event_type.to_owned(),
                from,
                reason,
            })?;
        }
        Ok(payload)
    }
}

/// Implements [`DomainEvent`] for an enum whose variants each wrap one
/// payload struct; the variant name is the stable type name.
macro_rules! domain_events {
    ($enum:ident { $($variant:ident($ty:ty) = $version:literal),* $(,)? }) => {
        impl $crate::event::DomainEvent for $enum {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => stringify!($variant),)*
                }
            }

            fn current_version(event_type: &str) -> Option<u32> {
                match event_type {
                    $(stringify!($variant) => Some($version),)*
                    _ => None,
                }
            }

            fn to_payload(&self) -> serde_json::Value {
                let value = match self {
                    $(Self::$variant(e) => serde_json::to_value(e),)*
                };
                // Payload structs have only string map keys, so this cannot fail.
                value.expect("event payloads always serialize")
            }

            fn from_current_payload(
                event_type: &str,
                payload: serde_json::Value,
            ) -> Result<Self, $crate::event::EventDecodeError> {
                match event_type {
                    $(stringify!($variant) => serde_json::from_value::<$ty>(payload)
                        .map(Self::$variant)
                        .map_err(|source| $crate::event::EventDecodeError::Payload {
                            event_type: event_type.to_owned(),
                            schema_version: $version,
                            source,
                        }),)*
                    _ => Err($crate::event::EventDecodeError::UnknownType {
                        event_type: event_type.to_owned(),
                    }),
                }
            }
        }
    };
}
pub(crate) use domain_events;
