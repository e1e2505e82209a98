//! sollol's decisions, kept pure: every function here is synchronous and total, does no IO and never
//! touches an async runtime, so each is tested with tables and properties instead of sockets. The
//! coordinator's gateway and cluster tasks call into it and act on the answers.

pub mod admission;
pub mod backoff;
pub mod breaker;
pub mod browser;
pub mod group;
pub mod health;
pub mod placement;
pub mod quota;
pub mod routing;
pub mod warmup;
