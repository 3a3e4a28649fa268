//! Domain rejections: a command that is not allowed in the aggregate's state.

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
}
