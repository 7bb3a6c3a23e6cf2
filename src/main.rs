//! The `pgrelay` command: parses the command line, loads the config and hands over to
//! the library. Nothing else happens here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod allocator;

#[derive(Debug, Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "PostgreSQL connection pooler and read/write-splitting proxy"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// The TOML configuration file.
        #[arg(short, long, env = "PGRELAY_CONFIG")]
        config: PathBuf,
        /// Take the listening sockets over from the pgrelay running with this
        /// takeover_socket; it then finishes its transactions and exits.
        #[arg(long, value_name = "PATH")]
        takeover: Option<PathBuf>,
    },
    /// Validate a configuration file: print every problem with its key path.
    Check {
        #[arg(short, long, env = "PGRELAY_CONFIG")]
        config: PathBuf,
    },
    /// Start a throwaway local primary and streaming replica with pgrelay in front of
    /// them; Ctrl-C stops and removes everything.
    Demo {
        /// Port for clients (default: 6432, or a free one if taken).
        #[arg(long)]
        port: Option<u16>,
    },
}

fn main() -> ExitCode {
    pgrelay::memory::set_release(allocator::purge);
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config: path, takeover } => match pgrelay::config::load(&path) {
            Ok(config) => run_async(
                config.server.workers,
                pgrelay::app::run_taking_over(config, path, takeover),
            ),
            Err(errors) => {
                eprintln!("{}: invalid configuration:\n{errors}", path.display());
                ExitCode::FAILURE
            }
        },
        Command::Demo { port } => run_async(0, pgrelay::demo::run(port)),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match pgrelay::config::load(path) {
        Ok(_) => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `future` on a multi-thread runtime of `workers` worker threads (0: one per core).
fn run_async<E: std::fmt::Display>(
    workers: usize,
    future: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    let runtime = match builder
        .enable_all()
        .on_thread_park(allocator::flush_thread_cache_if_it_grew)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pgrelay: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a container's log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
