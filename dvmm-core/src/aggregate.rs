//! The aggregate contract: decide purely, apply infallibly, rebuild from events.

use crate::error::DomainError;

/// An event-sourced aggregate. `Option<Self>` is the state: `None` before the
/// first event.
pub trait Aggregate: Sized + Clone {
    /// Stream type name (`VmRequest`, `Vm`).
    const STREAM_TYPE: &'static str;
    /// What the aggregate can be asked to do.
    type Command;
    /// What it records.
    type Event;

    /// Decides what happens, without side effects. An illegal command is a
    /// [`DomainError`] and emits nothing; a command that changes nothing may
    /// return no events.
    ///
    /// # Errors
    /// A [`DomainError`] when the command is not allowed in this state.
    fn handle(
        state: Option<&Self>,
        command: &Self::Command,
    ) -> Result<Vec<Self::Event>, DomainError>;

    /// Folds one event into the state. Never fails: events are facts.
    fn apply(state: Option<Self>, event: &Self::Event) -> Option<Self>;

    /// Rebuilds the state from its events.
    fn reconstitute<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Option<Self>
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(None, Self::apply)
    }
}
