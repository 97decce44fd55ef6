//! The crate's error type: what can go wrong when naming, configuring or parsing policies.
//!
//! Policies themselves do not fail with errors: an allocation that cannot be served is a
//! [`Decision::Oom`](crate::Decision::Oom), and the OOM policy decides what follows. Errors
//! here come from *configuration* (unknown names, bad parameters) and from the hint
//! language, and they always name the offending token so the config line or the hint call
//! can be fixed without guessing.

use crate::hint::HintError;

/// Everything the registry and the parsers can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No policy of that name is registered.
    #[error("unknown policy `{name}`; known policies: {}", known.join(", "))]
    UnknownPolicy {
        /// The name as given (without its parameter).
        name: String,
        /// Every registered name and alias, sorted.
        known: Vec<String>,
    },
    /// A policy was given a parameter it cannot accept.
    #[error("policy `{policy}`: bad parameter `{token}`: {reason}")]
    BadParameter {
        /// The policy's base name (`fhp`).
        policy: String,
        /// The offending token (`63K`).
        token: String,
        /// What was expected.
        reason: String,
    },
    /// A parameterised policy was named without its parameter (`fhp` instead of `fhp:64K`).
    #[error("policy `{policy}` needs a parameter: `{policy}:{example}`")]
    MissingParameter {
        /// The policy's base name.
        policy: String,
        /// An example parameter.
        example: String,
    },
    /// A policy that takes no parameter was given one.
    #[error("policy `{policy}` takes no parameter, got `{token}`")]
    UnexpectedParameter {
        /// The policy's base name.
        policy: String,
        /// The parameter given.
        token: String,
    },
    /// A name (or alias) was registered twice.
    #[error("policy name `{name}` is already registered")]
    DuplicateName {
        /// The name registered twice.
        name: String,
    },
    /// A name was used where a policy of another kind was required.
    #[error("policy `{name}` is a {found} policy, expected a {expected} policy")]
    WrongKind {
        /// The name as given.
        name: String,
        /// What it is.
        found: crate::registry::PolicyKind,
        /// What the caller wanted.
        expected: crate::registry::PolicyKind,
    },
    /// A policy set was asked for while no default of this kind is set.
    #[error("no default {kind} policy is set")]
    NoDefault {
        /// The kind missing a default.
        kind: crate::registry::PolicyKind,
    },
    /// A hint text did not parse.
    #[error(transparent)]
    Hint(#[from] HintError),
}

impl PolicyError {
    /// The error comes from the configuration text (a name or a parameter), not from a
    /// program's hint call: report it against the config line.
    pub fn is_config_error(&self) -> bool {
        !matches!(self, PolicyError::Hint(_))
    }

    /// The offending token, when the error has one (for underlining it in a message).
    pub fn token(&self) -> Option<&str> {
        match self {
            PolicyError::UnknownPolicy { name, .. } | PolicyError::DuplicateName { name } => {
                Some(name)
            }
            PolicyError::BadParameter { token, .. }
            | PolicyError::UnexpectedParameter { token, .. } => Some(token),
            PolicyError::WrongKind { name, .. } => Some(name),
            PolicyError::MissingParameter { .. } | PolicyError::NoDefault { .. } => None,
            PolicyError::Hint(h) => Some(&h.token),
        }
    }
}
