//! A private PostgreSQL installation tree per checkout.
//!
//! `cargo pgrx install` writes into whatever installation its pg_config names, and PostgreSQL loads
//! extensions only from its own share and lib directories. Installing into the system tree would make
//! two checkouts (or a test run and a demo) overwrite each other's tenant_scale, and needs root.
//! PostgreSQL finds its share and lib directories relative to the location of its executables, so a
//! tree whose bin/ holds hard links (or copies) of the system executables, and whose share/ and lib/
//! hold symlinks to the system files, is a complete installation of its own into which tenant_scale
//! can be installed without touching the system one.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Files of ours that must never be linked in from the system tree.
const OWN_FILE_PREFIX: &str = "tenant_scale";

/// Builds (or refreshes) a private installation under `root` mirroring the one `system_pg_config`
/// describes, and returns the private tree's pg_config. Quick when the tree is already current.
pub fn private_install(root: &Path, system_pg_config: &Path) -> Result<PathBuf> {
    let ask = |flag: &str| -> Result<PathBuf> {
        let out = Command::new(system_pg_config).arg(flag).output().context("running pg_config")?;
        if !out.status.success() {
            bail!("{} {flag} failed", system_pg_config.display());
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let (bindir, sharedir, pkglibdir) = (ask("--bindir")?, ask("--sharedir")?, ask("--pkglibdir")?);
    let inside = |dir: &Path| root.join(dir.strip_prefix("/").unwrap_or(dir));

    let private_bin = inside(&bindir);
    fs::create_dir_all(&private_bin)?;
    for entry in fs::read_dir(&bindir)? {
        let source = entry?.path();
        let target = private_bin.join(source.file_name().context("file name")?);
        // Executables must be real files here: PostgreSQL resolves symlinks to find its own location.
        if fs::metadata(&target)
            .is_ok_and(|meta| Some(meta.ino()) == fs::metadata(&source).ok().map(|m| m.ino()))
        {
            continue;
        }
        let _ = fs::remove_file(&target);
        if fs::hard_link(&source, &target).is_err() {
            fs::copy(&source, &target).with_context(|| format!("copying {}", source.display()))?;
        }
    }

    mirror_with_symlinks(&sharedir, &inside(&sharedir), |name| name == "extension")?;
    mirror_with_symlinks(&sharedir.join("extension"), &inside(&sharedir).join("extension"), |_| false)?;
    mirror_with_symlinks(&pkglibdir, &inside(&pkglibdir), |_| false)?;

    open_to_server_user(root)?;

    let pg_config = private_bin.join("pg_config");
    let reported = Command::new(&pg_config).arg("--sharedir").output()?;
    let reported = PathBuf::from(String::from_utf8_lossy(&reported.stdout).trim());
    if reported != inside(&sharedir) {
        bail!(
            "this PostgreSQL is not relocatable: {} reports {} instead of {}",
            pg_config.display(),
            reported.display(),
            inside(&sharedir).display()
        );
    }
    Ok(pg_config)
}

/// The server runs as another user when we are root: every real directory of the tree must be
/// readable and searchable by it, whatever the umask was.
fn open_to_server_user(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            open_to_server_user(&entry.path())?;
        }
    }
    Ok(())
}

/// Makes `target` a real directory holding a symlink to every entry of `source`, except our own
/// files and the entries `keep_real` selects (which the caller fills itself).
fn mirror_with_symlinks(source: &Path, target: &Path, keep_real: impl Fn(&str) -> bool) -> Result<()> {
    fs::create_dir_all(target)?;
    for entry in fs::read_dir(source).with_context(|| format!("reading {}", source.display()))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?.to_string_lossy().into_owned();
        if name.starts_with(OWN_FILE_PREFIX) || keep_real(&name) {
            continue;
        }
        let link = target.join(&name);
        if fs::read_link(&link).is_ok_and(|points_to| points_to == path) {
            continue;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}
