//! The `sollol` binary: parse arguments and configuration, start logging, build the runtime, run the command.

use std::io::IsTerminal;
use std::process::ExitCode;

use sollol::cli::{self, EXIT_FAILURE, EXIT_USAGE};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the C library's allocator: the gateway allocates and frees small buffers on
/// every request, and glibc's malloc (musl's even more) spent about a fifth of its time there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let env = std::env::vars()
        .filter(|(name, _)| name.starts_with("SOLLOL_"))
        .collect();
    let (raw, config) = match cli::load_config(&cli, env) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!(
                "error: invalid value {:?} for `log_level`: {error}",
                config.log_level
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // Thousands of client connections must not run into the usual soft limit of 1,024 files.
    sollol_http::raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sollol")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(cli::run(cli.command, &raw, config))
}
