//! Command-line face of the harness, for the shell scripts:
//! - `ts-cluster start DIR` / `ts-cluster stop DIR`: the demo's long-lived cluster;
//! - `ts-cluster pg-install DIR`: a private PostgreSQL installation tree for one checkout;
//! - `ts-cluster regress ...`: the pg_regress suite against a throwaway cluster
//!   (`cargo pgrx regress` cannot run as root).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tenant_scale_harness::Cluster;

#[derive(Parser)]
#[command(about = "PostgreSQL clusters for tenant_scale's scripts")]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Start (or reuse) a cluster kept in DIR that preloads tenant_scale, leave it running, print its port.
    Start { dir: PathBuf },
    /// Stop the cluster kept in DIR, if one runs there.
    Stop { dir: PathBuf },
    /// Build or refresh a private PostgreSQL installation tree in DIR; print its pg_config.
    PgInstall {
        dir: PathBuf,
        /// The system installation to mirror.
        #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_config")]
        from: PathBuf,
    },
    /// Run a pg_regress schedule against a throwaway cluster that preloads tenant_scale.
    Regress {
        /// Directory holding sql/ and expected/.
        #[arg(long)]
        inputdir: PathBuf,
        /// Where results/ and regression.diffs go.
        #[arg(long)]
        outputdir: PathBuf,
        /// Schedule file listing the tests in order.
        #[arg(long)]
        schedule: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ts-cluster: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(action: Action) -> Result<ExitCode> {
    match action {
        Action::Start { dir } => {
            let cluster = Cluster::builder().without_extension().in_dir(dir).start()?;
            println!("{}", cluster.port());
            cluster.detach();
        }
        Action::Stop { dir } => {
            if !Cluster::stop_in_dir(&dir)? {
                eprintln!("ts-cluster: no server running in {}", dir.display());
            }
        }
        Action::PgInstall { dir, from } => {
            println!("{}", tenant_scale_harness::private_install(&dir, &from)?.display());
        }
        Action::Regress { inputdir, outputdir, schedule } => {
            return regress(&inputdir, &outputdir, &schedule);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn regress(inputdir: &Path, outputdir: &Path, schedule: &Path) -> Result<ExitCode> {
    let cluster = Cluster::builder().without_extension().start()?;
    let pg_regress = tenant_scale_harness::pg_regress_path()?;
    std::fs::create_dir_all(outputdir)?;
    let status = Command::new(&pg_regress)
        .arg(format!("--bindir={}", tenant_scale_harness::pg_bindir()?.display()))
        .arg(format!("--inputdir={}", inputdir.display()))
        .arg(format!("--outputdir={}", outputdir.display()))
        .arg(format!("--schedule={}", schedule.display()))
        .arg(format!("--port={}", cluster.port()))
        .args(["--host=127.0.0.1", "--user=postgres", "--dbname=regression"])
        .status()
        .with_context(|| format!("running {}", pg_regress.display()))?;
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    if let Ok(diffs) = std::fs::read_to_string(outputdir.join("regression.diffs")) {
        eprintln!("{diffs}");
    }
    let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    eprintln!("--- last lines of the server log ---");
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
    Ok(ExitCode::FAILURE)
}
