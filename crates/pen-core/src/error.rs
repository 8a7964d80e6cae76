//! Errors the CLI reports specially. Everything else travels as `anyhow::Error` with context.

/// Bad input from the user: reported as one `pen: ...` line and exit status 2.
/// Raised before anything is created, so a usage error never leaves state behind.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> Self {
        UsageError(message.into())
    }
}

/// Shorthand: `return usage!("bad {thing}")` inside a function returning `anyhow::Result`.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        Err(anyhow::Error::new($crate::UsageError::new(format!($($arg)*))))
    };
}
