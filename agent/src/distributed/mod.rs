//! Distributed inference (experimental): a model's layers split across agents. The driving side plans
//! and runs pipelines (`pipeline`), the agents' side serves stages (`stage`, with `partial` copies of
//! a model fetched from peers), and `sharding` decides which models the coordinator distributes by
//! itself. The built-in engine reaches all of it through `sollol_engine::RemoteCompute`.

pub(crate) mod front;
pub(crate) mod manifest;
pub(crate) mod partial;
pub mod pipeline;
pub(crate) mod sharding;
pub mod stage;
