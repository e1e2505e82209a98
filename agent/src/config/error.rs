//! Where a raw value came from ([`Source`]) and what can go wrong loading or validating ([`ConfigError`]).

use std::fmt;
use std::path::PathBuf;

/// Where a raw value came from, for error messages and `print-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
    Cli,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Cli => f.write_str("command line"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", .path.display())]
    ParseFile { path: PathBuf, message: String },
    #[error("unknown key `{key}` in config file {}", .path.display())]
    UnknownKey { key: String, path: PathBuf },
    #[error("invalid value {value:?} for `{key}` (from {origin}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        reason: String,
    },
    #[error("`{key}` is required: {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}
