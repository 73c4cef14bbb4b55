//! The `sealgate` command line (SPEC section 1). Exit codes: 0 ok, 1 invalid
//! input or config, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{config, demo, logging, server};

const DEFAULT_CONFIG: &str = "/etc/sealgate/sealgate.toml";

#[derive(Parser)]
#[command(
    name = "sealgate",
    version,
    about = "Egress proxy that holds data-source credentials so app servers never do"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM (drain) or SIGINT (immediate).
    Run {
        #[arg(short, long, env = "SEALGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the config; print every error found, each with file and line.
    Check {
        #[arg(short, long, env = "SEALGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run a self-contained demo on loopback: an echo upstream with sealgate in front.
    Demo,
}

pub fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Demo => {
            logging::init();
            report(demo::run())
        }
    }
}

fn load(path: &Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("sealgate: {e}");
        }
        ExitCode::from(1)
    })
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(c) => {
            println!(
                "{}: ok ({} data source{})",
                path.display(),
                c.datasources.len(),
                if c.datasources.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init();
    report(server::serve(config))
}

fn report<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealgate: {e}");
            ExitCode::from(1)
        }
    }
}
