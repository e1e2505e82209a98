//! The command line: argument definitions, the config sources they give, and what each command does.
//!
//! Exit codes: 0 success, 64 bad usage or configuration, 1 start-up or run-time failure.
//!
//! The files keep commands and terminal rendering apart: `args` defines the arguments and the
//! configuration they give, `commands` runs each command, `models` the model commands (`models`,
//! `pull`, `rm`: the matrix, and changes through the gateway with progress), and `render` turns the coordinator's
//! answers into the text and tables a person reads (pure functions, unit-tested).

mod args;
mod commands;
mod models;
mod render;

pub use args::{AgentArgs, Cli, ClientArgs, Command, CoordinatorArgs, load_config, parse};
pub use commands::{INSTALL_SCRIPT, run};
pub use render::{
    fetched_text, render_discovery, render_nodes, render_plan, render_progress, render_status,
};

/// Exit code for bad usage or configuration (BSD `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a failure to start or run.
pub const EXIT_FAILURE: u8 = 1;
