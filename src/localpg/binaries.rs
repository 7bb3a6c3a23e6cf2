//! Finds the PostgreSQL binaries (`postgres`, `initdb`, `psql`, `pgbench`, ...) clusters are built from.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{Error, Result};

/// Debian keeps one directory per server version here; other distributions may too.
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";
/// Debian installs some client tools (pgbench among them) only as wrappers in /usr/bin.
const FALLBACK_DIR: &str = "/usr/bin";
const REQUIRED: [&str; 4] = ["postgres", "initdb", "pg_ctl", "pg_basebackup"];

/// A located PostgreSQL installation.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    dir: PathBuf,
    version: String,
    major: u32,
}

impl PgBinaries {
    /// `PGRELAY_PG_BIN` if set (and then it must be right: a wrong explicit setting is an error,
    /// not a reason to silently use something else), else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn locate() -> Result<Self> {
        locate_in(
            std::env::var_os("PGRELAY_PG_BIN"),
            pg_config_bindir(),
            Path::new(VERSIONED_ROOT),
        )
    }

    /// The directory holding `postgres`, `initdb` and friends.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The full version, e.g. `15.13`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The major version, e.g. `15`.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// Path of a PostgreSQL program: the bin directory first, then /usr/bin.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        [self.dir.as_path(), Path::new(FALLBACK_DIR)]
            .iter()
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| Error::BinaryNotFound {
                name: name.to_string(),
                dir: self.dir.clone(),
            })
    }
}

pub(super) fn locate_in(
    env_dir: Option<OsString>,
    pg_config_dir: Option<PathBuf>,
    versioned_root: &Path,
) -> Result<PgBinaries> {
    if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if let Some(missing) = REQUIRED.iter().find(|n| !is_executable(&dir.join(n))) {
            return Err(Error::BadBinDir {
                dir,
                missing: (*missing).to_string(),
            });
        }
        return with_version(dir);
    }
    let mut searched = Vec::new();
    if let Some(dir) = pg_config_dir {
        if has_server(&dir) {
            return with_version(dir);
        }
        searched.push(format!("{} (from pg_config --bindir)", dir.display()));
    }
    if let Some(dir) = newest_versioned(versioned_root) {
        return with_version(dir);
    }
    searched.push(format!("{}/*/bin", versioned_root.display()));
    Err(Error::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn has_server(dir: &Path) -> bool {
    REQUIRED.iter().all(|n| is_executable(&dir.join(n)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pg_config_bindir() -> Option<PathBuf> {
    // pg_config only prints paths: harmless to run as whoever we are.
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/{9.6,15,16}/bin` -> the 16 one.
fn newest_versioned(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = version_key(&name)?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((key, bin))
        })
        .max_by_key(|(key, _)| *key)
        .map(|(_, bin)| bin)
}

/// "9.6" -> (9, 6), "15" -> (15, 0); None for names that are not versions.
fn version_key(name: &str) -> Option<(u32, u32)> {
    let mut parts = name.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        Some(m) => m.parse().ok()?,
        None => 0,
    };
    parts.next().is_none().then_some((major, minor))
}

fn with_version(dir: PathBuf) -> Result<PgBinaries> {
    // `postgres --version` is answered before the refuse-to-run-as-root check, so no uid switch.
    let postgres = dir.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(|e| Error::io(format!("running {} --version", postgres.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (version, major) = parse_version(&text).ok_or_else(|| Error::CommandFailed {
        command: format!("{} --version", postgres.display()),
        status: out.status.to_string(),
        stderr: format!(
            "unexpected output {:?} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        log_tail: String::new(),
    })?;
    if major < 12 {
        return Err(Error::UnsupportedVersion { dir, version });
    }
    Ok(PgBinaries { dir, version, major })
}

/// "postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)" -> ("15.13", 15).
pub(super) fn parse_version(text: &str) -> Option<(String, u32)> {
    let rest = text.split("(PostgreSQL)").nth(1)?.trim_start();
    let version = rest.split_whitespace().next()?.to_string();
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse().ok()?;
    Some((version, major))
}
