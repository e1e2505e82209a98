//! The cluster: who is in it and how they talk. The coordinator's live view of the nodes (`view`),
//! its cluster port (`membership`) and the agents' side of it (`join`), the framed and authenticated
//! protocol both speak (`wire`, `identity`), encrypted once the token is proved (`secure`), and the ways nodes are found: static Ollama servers
//! (`discovery`), range scans (`scan`) and multicast DNS (`mdns`).

pub(crate) mod discovery;
pub mod group;
pub mod identity;
pub mod join;
pub(crate) mod mdns;
pub(crate) mod membership;
pub(crate) mod scan;
pub mod secure;
mod view;
pub mod wire;

pub use view::*;
