//! The `sealgate` command line (SPEC section 1). Exit codes: 0 ok, 1 invalid
//! input or config, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::io::IsTerminal;

use crate::{audit_chain, config, demo, keytool, logging, secrets, server};

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
    /// Write a new 256-bit master key to FILE (named <key-id>.key, mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a new random instance salt for [keys] salt.
    Salt,
    /// Read a secret from stdin and print its sealed value for one data source and field.
    Seal {
        #[arg(short, long, env = "SEALGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        datasource: String,
        /// The key inside `credential`: token, password or value.
        #[arg(long)]
        field: String,
    },
    /// Re-encrypt every sealed value in the config under the primary key.
    Reseal {
        #[arg(short, long, env = "SEALGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Work with the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the chain of audit files given oldest first (a rotated
    /// series): exit 0, or 1 naming the file and first line that was
    /// altered, removed, reordered or inserted.
    Verify {
        #[arg(short, long, env = "SEALGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    // Keys and plaintexts live in this process's memory: no core dump and
    // no same-user ptrace may read them.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("sealgate: warning: cannot make the process non-dumpable: {e}");
    }
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Demo => {
            logging::init(&config::LogSettings::default());
            report(demo::run())
        }
        Command::Keygen { out } => report(keytool::keygen(&out).map(|msg| eprintln!("{msg}"))),
        Command::Salt => report(secrets::new_salt().map(|salt| println!("{salt}"))),
        Command::Seal {
            config,
            datasource,
            field,
        } => {
            if std::io::stdin().is_terminal() {
                eprintln!("sealgate: type the secret, then Enter and Ctrl-D");
            }
            report(
                keytool::seal(&config, &datasource, &field, std::io::stdin().lock())
                    .map(|sealed| println!("{sealed}")),
            )
        }
        Command::Audit {
            command: AuditCommand::Verify { config, files },
        } => verify_audit(&config, &files),
        Command::Reseal { config } => report(keytool::reseal(&config).map(|r| {
            eprintln!(
                "{}: resealed {} value{} under key \"{}\"; {} already under it",
                config.display(),
                r.resealed,
                if r.resealed == 1 { "" } else { "s" },
                r.primary,
                r.already_primary
            )
        })),
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
        Ok(c) if !c.egress_problems.is_empty() => {
            for e in &c.egress_problems {
                eprintln!("sealgate: {e}");
            }
            ExitCode::from(1)
        }
        Ok(c) => {
            for warning in &c.expired_grants {
                eprintln!("sealgate: warning: {warning}");
            }
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

fn verify_audit(config: &Path, files: &[PathBuf]) -> ExitCode {
    let keyring = match config::load_keyring(config) {
        Ok(keyring) => keyring,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("sealgate: {e}");
            }
            return ExitCode::from(1);
        }
    };
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    match audit_chain::verify(&keyring, &files) {
        Ok(verified) => {
            println!(
                "{} line{} in {} file{} verified (key{} {})",
                verified.lines,
                if verified.lines == 1 { "" } else { "s" },
                files.len(),
                if files.len() == 1 { "" } else { "s" },
                if verified.key_ids.len() == 1 { "" } else { "s" },
                verified.key_ids.join(", ")
            );
            if verified.continues_earlier {
                println!(
                    "note: the first file continues a chain from an earlier file that was not given"
                );
            }
            ExitCode::SUCCESS
        }
        Err(broken) => {
            eprintln!("sealgate: {broken}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(&config.log);
    report(server::serve(config))
}

fn report<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line per error, each naming what is wrong and where.
            for line in e.to_string().lines() {
                eprintln!("sealgate: {line}");
            }
            ExitCode::from(1)
        }
    }
}
