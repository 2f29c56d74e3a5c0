//! Operating-system plumbing shared by the server handles: the PostgreSQL installation, running as the
//! server user, free ports, scratch directories and process inspection.

use std::ffi::CString;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The user PostgreSQL runs as when the harness itself runs as root.
const SERVER_USER: &str = "postgres";

/// Directories of the PostgreSQL installation the harness drives, from its pg_config.
pub(crate) struct PgInstall {
    pub bindir: PathBuf,
    pub sharedir: PathBuf,
    pub pkglibdir: PathBuf,
}

/// `PG_CONFIG` when set, else Debian's PostgreSQL 15, else whatever pg_config is on PATH.
pub(crate) fn pg_install() -> Result<&'static PgInstall> {
    static INSTALL: OnceLock<PgInstall> = OnceLock::new();
    if let Some(install) = INSTALL.get() {
        return Ok(install);
    }
    let pg_config = std::env::var_os("PG_CONFIG").map(PathBuf::from).unwrap_or_else(|| {
        let debian = PathBuf::from("/usr/lib/postgresql/15/bin/pg_config");
        if debian.exists() { debian } else { PathBuf::from("pg_config") }
    });
    let ask = |flag: &str| -> Result<PathBuf> {
        let out = Command::new(&pg_config)
            .arg(flag)
            .output()
            .with_context(|| format!("running {} {flag}", pg_config.display()))?;
        if !out.status.success() {
            bail!("{} {flag} failed: {}", pg_config.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let install =
        PgInstall { bindir: ask("--bindir")?, sharedir: ask("--sharedir")?, pkglibdir: ask("--pkglibdir")? };
    Ok(INSTALL.get_or_init(|| install))
}

/// Directory of the PostgreSQL programs (psql, pg_ctl, pgbench, ...).
pub fn pg_bindir() -> Result<PathBuf> {
    Ok(pg_install()?.bindir.clone())
}

/// pg_regress as shipped in postgresql-server-dev (PGXS).
pub fn pg_regress_path() -> Result<PathBuf> {
    let path = pg_install()?.pkglibdir.join("pgxs/src/test/regress/pg_regress");
    if !path.exists() {
        bail!("{} is missing: install postgresql-server-dev-15 (scripts/setup does)", path.display());
    }
    Ok(path)
}

pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL server-side program, run as the server user when we are root.
///
/// A server never has Rust's backtrace switches set in production; a developer's shell often has,
/// and pgrx would then append a backtrace to the DETAIL of the extension's errors. Servers run
/// without them so that every test sees what users see.
pub(crate) fn server_command(program: &Path) -> Command {
    let mut command = if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", SERVER_USER, "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    command.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    command
}

/// Runs a command to completion; a non-zero exit becomes an error carrying its output.
pub(crate) fn run(command: &mut Command, what: &str) -> Result<Output> {
    let output = command.output().with_context(|| format!("{what}: could not run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A port nobody listens on right now. Another process may take it before we bind it; callers that
/// can tell (a server failing with "could not bind") pick another one and retry.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh scratch directory under the system temporary directory, owned by the server user when we
/// are root so that initdb and the server can write into it. Removed when the handle is dropped.
pub(crate) fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().context("creating a scratch directory")?;
    give_to_server_user(dir.path())?;
    Ok(dir)
}

/// Makes `path` (a directory we created) writable by the server user.
pub(crate) fn give_to_server_user(path: &Path) -> Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let (uid, gid) = server_user_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("handing {} to {SERVER_USER}", path.display()))
}

fn server_user_ids() -> Result<(u32, u32)> {
    let name = CString::new(SERVER_USER).expect("static name has no NUL");
    // SAFETY: getpwnam returns NULL or a pointer to static storage valid until the next call; we copy
    // the two integers out immediately.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        bail!("user {SERVER_USER} does not exist: install postgresql-15 (scripts/setup does)");
    }
    // SAFETY: checked non-NULL above.
    Ok(unsafe { ((*entry).pw_uid, (*entry).pw_gid) })
}

/// Records a server the harness started in the directory `TENANT_SCALE_PID_DIR` names (set by
/// scripts/test), so that the suite can tell afterwards whether anything it started outlived it without
/// mistaking another checkout's servers for its own. Nothing is recorded when the variable is unset.
pub(crate) fn record_server_pid(pid: u32) {
    if let Some(dir) = std::env::var_os("TENANT_SCALE_PID_DIR") {
        let _ = fs::write(Path::new(&dir).join(pid.to_string()), "");
    }
}

/// True while `pid` is a live process (a zombie, dead but not reaped, counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => process_state(&stat) != Some('Z'),
        Err(_) => false,
    }
}

pub(crate) fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| process_state(&stat) == Some('Z'))
}

/// The state letter of a /proc/PID/stat line; the command name before it is parenthesised and may hold
/// spaces, so the state is the first field after the last ')'.
fn process_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Processes whose parent is `pid`.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat")).ok().and_then(|stat| {
                let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()?;
                Some(ppid == pid)
            }) == Some(true)
        })
        .collect()
}

pub(crate) fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Polls `done` until it holds or `timeout` passes; true when it held.
pub(crate) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::process_state;

    #[test]
    fn process_state_survives_spaces_and_parentheses_in_the_command_name() {
        assert_eq!(process_state("123 (postgres: a (b) c) S 1 2 3"), Some('S'));
        assert_eq!(process_state("7 (x) Z 1"), Some('Z'));
        assert_eq!(process_state("garbage"), None);
    }
}
