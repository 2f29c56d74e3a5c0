//! PostgreSQL clusters and streaming standbys.
//!
//! A cluster lives in one root directory: `data/` (PGDATA), `sock/` (its Unix socket, so clusters never
//! meet in /var/run/postgresql) and `server.log`. Clients connect over TCP to 127.0.0.1 with trust
//! authentication as the `postgres` superuser.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::os::{
    children_of, free_port, give_to_server_user, is_zombie, kill, pg_install, process_alive,
    record_server_pid, run, scratch_dir, server_command, tail, wait_until,
};

const EXTENSION: &str = "tenant_scale";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;

/// How `pg_ctl stop` ends the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Clean shutdown: clients are disconnected, a shutdown checkpoint is written and extensions run
    /// their shutdown hooks (this is the mode that keeps data saved at shutdown).
    Fast,
    /// Abort without a checkpoint; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn pg_ctl_name(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Settings for a cluster that has not started yet. By default the cluster preloads tenant_scale and
/// has the extension created in the `postgres` database.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
    preload: bool,
    create_extension: bool,
    dir: Option<PathBuf>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder { settings: Vec::new(), preload: true, create_extension: true, dir: None }
    }
}

impl ClusterBuilder {
    /// A postgresql.conf setting; later calls win over earlier ones and over the harness defaults.
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Leave tenant_scale out of shared_preload_libraries (the library then loads on first use).
    pub fn without_preload(mut self) -> Self {
        self.preload = false;
        self
    }

    /// Do not run CREATE EXTENSION (pg_regress files and the demo create it themselves).
    pub fn without_extension(mut self) -> Self {
        self.create_extension = false;
        self
    }

    /// Keep the cluster in `dir` instead of a scratch directory. A cluster already there is reused as
    /// it is (started if it was stopped); its files stay when the handle is dropped.
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    pub fn start(self) -> Result<Cluster> {
        if self.preload || self.create_extension {
            ensure_extension_installed()?;
        }
        let (scratch, root) = match &self.dir {
            Some(dir) => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let root = fs::canonicalize(dir)?;
                give_to_server_user(&root)?;
                (None, root)
            }
            None => {
                let scratch = scratch_dir("tenant_scale-pg-")?;
                let root = scratch.path().to_path_buf();
                (Some(scratch), root)
            }
        };
        let mut cluster = Cluster { scratch, root, port: 0, running: false, detached: false };
        if cluster.data_dir().join("PG_VERSION").exists() {
            cluster.port = cluster.recorded_port()?;
            if cluster.postmaster_pid().is_some_and(process_alive) {
                cluster.running = true;
                return Ok(cluster);
            }
            cluster.start()?;
            return Ok(cluster);
        }
        cluster.init(&self)?;
        cluster.start_on_free_port()?;
        if self.create_extension {
            cluster.psql(&format!("CREATE EXTENSION {EXTENSION}"))?;
        }
        Ok(cluster)
    }
}

/// A running (or deliberately stopped) PostgreSQL server. Dropping the handle stops the server and,
/// for scratch clusters, removes its files.
pub struct Cluster {
    scratch: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    running: bool,
    detached: bool,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// libpq keyword/value connection string for the `postgres` database.
    pub fn connstr(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// The same as a URL, for clients configured from DATABASE_URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn connect(&self) -> Result<postgres::Client> {
        self.connect_as("postgres", "postgres")
    }

    /// A connection as `user` to `database` (authentication is trust, so any existing role works).
    pub fn connect_as(&self, user: &str, database: &str) -> Result<postgres::Client> {
        let connstr = format!("host=127.0.0.1 port={} user={user} dbname={database}", self.port);
        postgres::Client::connect(&connstr, postgres::NoTls)
            .with_context(|| format!("connecting to {database} as {user} on port {}", self.port))
    }

    /// Runs SQL through psql (stops at the first error) and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = pg_install()?.bindir.join("psql");
        let output = run(
            Command::new(psql)
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
                .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]),
            "psql",
        )?;
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_string())
    }

    /// PID of the postmaster, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// Starts a streaming standby of this cluster (`pg_basebackup -R -X stream -c fast`) on its own port
    /// and waits until it streams.
    pub fn start_standby(&self) -> Result<Cluster> {
        let scratch = scratch_dir("tenant_scale-standby-")?;
        let root = scratch.path().to_path_buf();
        let mut standby = Cluster { scratch: Some(scratch), root, port: 0, running: false, detached: false };
        let basebackup = pg_install()?.bindir.join("pg_basebackup");
        run(
            server_command(&basebackup)
                .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream", "-c", "fast"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-D")
                .arg(standby.data_dir()),
            "pg_basebackup",
        )?;
        standby.make_socket_dir()?;
        standby.append_settings(&[(
            "unix_socket_directories".to_string(),
            standby.socket_dir().display().to_string(),
        )])?;
        standby.start_on_free_port()?;
        let streaming = wait_until(START_TIMEOUT, || {
            standby.psql("SELECT status FROM pg_stat_wal_receiver").is_ok_and(|status| status == "streaming")
        });
        if !streaming {
            bail!(
                "standby on port {} did not start streaming:\n{}",
                standby.port,
                tail(&standby.log_path(), 30)
            );
        }
        Ok(standby)
    }

    /// Starts a stopped or crashed server again on its recorded port.
    pub fn start(&mut self) -> Result<()> {
        let pg_ctl = pg_install()?.bindir.join("pg_ctl");
        let started = run(
            server_command(&pg_ctl)
                .args(["start", "-w", "-t", &START_TIMEOUT.as_secs().to_string(), "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path()),
            "pg_ctl start",
        );
        match started {
            Ok(_) => {
                self.running = true;
                if let Some(pid) = self.postmaster_pid() {
                    record_server_pid(pid);
                }
                Ok(())
            }
            Err(error) => Err(error.context(format!("server log:\n{}", tail(&self.log_path(), 30)))),
        }
    }

    pub fn stop(&mut self, mode: StopMode) -> Result<()> {
        let pg_ctl = pg_install()?.bindir.join("pg_ctl");
        run(
            server_command(&pg_ctl)
                .args(["stop", "-w", "-t", "60", "-m", mode.pg_ctl_name(), "-D"])
                .arg(self.data_dir()),
            "pg_ctl stop",
        )?;
        self.running = false;
        Ok(())
    }

    pub fn restart(&mut self, mode: StopMode) -> Result<()> {
        self.stop(mode)?;
        self.start()
    }

    /// `kill -9` of the postmaster, as a crash test needs. Returns once every server process is gone,
    /// leaving the cluster ready for `start()` (which then runs crash recovery).
    pub fn crash(&mut self) -> Result<()> {
        let Some(pid) = self.postmaster_pid() else { bail!("no postmaster.pid: the server is not running") };
        let children = children_of(pid);
        kill(pid, libc::SIGKILL);
        let gone = wait_until(Duration::from_secs(30), || {
            !process_alive(pid) && children.iter().all(|child| !process_alive(*child))
        });
        if !gone {
            bail!("server processes outlived kill -9 of postmaster {pid} for 30 s");
        }
        // Nothing reaps an orphaned postmaster on some machines: PostgreSQL would see its PID alive as a
        // zombie and refuse to start ("lock file already exists"), so remove the stale lock files.
        if is_zombie(pid) {
            let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
            let _ = fs::remove_file(self.socket_dir().join(format!(".s.PGSQL.{}.lock", self.port)));
        }
        self.running = false;
        Ok(())
    }

    /// Leaves the server running after the handle is gone (the demo's cluster); `stop_in_dir` stops it.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Stops a cluster that `detach` left running in `dir`. Returns false when none was running there.
    pub fn stop_in_dir(dir: &Path) -> Result<bool> {
        let data = dir.join("data");
        let pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        if !pid.is_some_and(process_alive) {
            return Ok(false);
        }
        let pg_ctl = pg_install()?.bindir.join("pg_ctl");
        run(
            server_command(&pg_ctl).args(["stop", "-w", "-t", "60", "-m", "fast", "-D"]).arg(&data),
            "pg_ctl stop",
        )?;
        Ok(true)
    }

    fn init(&mut self, builder: &ClusterBuilder) -> Result<()> {
        let initdb = pg_install()?.bindir.join("initdb");
        run(
            server_command(&initdb)
                .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "-D"])
                .arg(self.data_dir()),
            "initdb",
        )?;
        self.make_socket_dir()?;
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("unix_socket_directories", self.socket_dir().display().to_string()),
            // Test clusters lose nothing to fsync=off unless the machine itself crashes, and a
            // postmaster killed with -9 still leaves every write in the page cache.
            ("fsync", "off".to_string()),
            ("log_line_prefix", "%m [%p] %q%a ".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        if builder.preload {
            settings.push(("shared_preload_libraries".to_string(), EXTENSION.to_string()));
        }
        settings.extend(builder.settings.iter().cloned());
        self.append_settings(&settings)
    }

    fn make_socket_dir(&self) -> Result<()> {
        fs::create_dir_all(self.socket_dir())?;
        give_to_server_user(&self.socket_dir())
    }

    fn append_settings(&self, settings: &[(String, String)]) -> Result<()> {
        let conf_path = self.data_dir().join("postgresql.conf");
        let mut conf = OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .with_context(|| format!("opening {}", conf_path.display()))?;
        writeln!(conf, "\n# tenant_scale harness")?;
        for (name, value) in settings {
            writeln!(conf, "{name} = '{}'", value.replace('\'', "''"))?;
        }
        Ok(())
    }

    /// The port is recorded in postgresql.conf (the last `port` line wins, as in PostgreSQL), so a kept
    /// cluster restarts where clients expect it.
    fn recorded_port(&self) -> Result<u16> {
        let conf = fs::read_to_string(self.data_dir().join("postgresql.conf"))?;
        conf.lines()
            .rev()
            .find_map(|line| line.trim().strip_prefix("port = ")?.trim_matches('\'').parse().ok())
            .context("no port recorded in postgresql.conf")
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port()?;
            self.append_settings(&[("port".to_string(), self.port.to_string())])?;
            match self.start() {
                Ok(()) => return Ok(()),
                Err(_) if tail(&self.log_path(), 5).contains("could not bind") => continue,
                Err(error) => return Err(error),
            }
        }
        bail!("no free port after {PORT_ATTEMPTS} attempts")
    }

    fn shut_down(&mut self) {
        if self.stop(StopMode::Immediate).is_ok() {
            return;
        }
        if let Some(pid) = self.postmaster_pid().filter(|pid| process_alive(*pid)) {
            let children = children_of(pid);
            kill(pid, libc::SIGKILL);
            wait_until(Duration::from_secs(10), || children.iter().all(|child| !process_alive(*child)));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            if let Some(scratch) = self.scratch.take() {
                let _ = scratch.keep();
            }
            return;
        }
        if std::thread::panicking() {
            eprintln!("--- last lines of {} ---\n{}", self.log_path().display(), tail(&self.log_path(), 40));
        }
        if self.running {
            self.shut_down();
        }
    }
}

fn ensure_extension_installed() -> Result<()> {
    let install = pg_install()?;
    let control = install.sharedir.join("extension").join(format!("{EXTENSION}.control"));
    let library = install.pkglibdir.join(format!("{EXTENSION}.so"));
    if !control.exists() || !library.exists() {
        bail!(
            "{EXTENSION} is not installed into this PostgreSQL ({} or {} is missing): \
             run `cargo pgrx install --pg-config {}/pg_config` (scripts/test does it before the tests)",
            control.display(),
            library.display(),
            install.bindir.display()
        );
    }
    Ok(())
}
