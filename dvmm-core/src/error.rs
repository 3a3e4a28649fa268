//! Domain rejections: a command that is not allowed in the aggregate's state.

use crate::spec::NameError;

/// A command was rejected by an aggregate. Nothing was recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The command needs an aggregate that does not exist yet.
    #[error("{aggregate} does not exist")]
    NotFound {
        /// Aggregate type.
        aggregate: &'static str,
    },
    /// The aggregate already exists; it cannot be created twice.
    #[error("{aggregate} already exists")]
    AlreadyExists {
        /// Aggregate type.
        aggregate: &'static str,
    },
    /// The command is not allowed in the current status.
    #[error("cannot {action} a {aggregate} that is {status}")]
    InvalidTransition {
        /// Aggregate type.
        aggregate: &'static str,
        /// What was attempted, e.g. `approve`.
        action: &'static str,
        /// The current status.
        status: String,
    },
    /// The command's own data is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The requested VM name breaks the naming rules; the error says which
    /// part ([`NameError::part`]), so a form can mark that field.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A free-text field is longer than the domain accepts.
    #[error("{field} is {actual} characters long; at most {max} are accepted")]
    TooLong {
        /// The field, e.g. `justification`.
        field: &'static str,
        /// The limit, in characters.
        max: usize,
        /// The length given, in characters.
        actual: usize,
    },
}

/// The longest free text (a justification, a rejection or cancellation
/// reason) a request accepts, in characters. It is stored in every copy of
/// the event and shown on the timeline, so it is bounded like any input.
pub const MAX_TEXT_CHARS: usize = 4000;

/// Refuses free text over [`MAX_TEXT_CHARS`].
pub(crate) fn bounded_text(field: &'static str, text: &str) -> Result<(), DomainError> {
    // Counting stops just past the limit, so a huge input costs no more
    // than a valid one.
    let actual = text.chars().take(MAX_TEXT_CHARS + 1).count();
    if actual > MAX_TEXT_CHARS {
        return Err(DomainError::TooLong {
            field,
            max: MAX_TEXT_CHARS,
            actual: text.chars().count(),
        });
    }
    Ok(())
}
