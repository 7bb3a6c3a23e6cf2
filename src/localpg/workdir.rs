//! A cluster's private temporary directory: created under a unique name, and swept up later if
//! the process that made it died without cleaning up (a SIGKILLed test run, say).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Error, Result};
use super::node::processes_in;
use super::privileges::RunAs;

const PREFIX: &str = "pgrelay-localpg-";
/// Holds "PID PID-NAMESPACE" of the creating process, so only directories whose creator is
/// known to be dead are swept (another container sharing /tmp has other PIDs).
const OWNER_FILE: &str = "owner";
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh 0700 directory under the system temp directory, owned by the PostgreSQL user,
/// and returns its canonical path.
pub(super) fn create(run_as: &RunAs) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    sweep_stale(&base);
    let pid = std::process::id();
    for _ in 0..100 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{PREFIX}{pid}-{seq}-{nanos:08x}"));
        match run_as.create_private_dir(&path) {
            Ok(()) => {}
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                continue;
            }
            Err(e) => return Err(e),
        }
        let path = std::fs::canonicalize(&path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        let owner = format!("{pid} {}\n", pid_namespace().unwrap_or_default());
        run_as.create_private_file(&path.join(OWNER_FILE), &owner)?;
        if let Err(e) = run_as.check_reachable(&path) {
            let _ = std::fs::remove_dir_all(&path);
            return Err(e);
        }
        return Ok(path);
    }
    Err(Error::io(
        format!("creating a unique directory under {}", base.display()),
        std::io::Error::new(std::io::ErrorKind::AlreadyExists, "every name tried was taken"),
    ))
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

/// Removes directories of ours whose creating process is gone and in which nothing runs.
fn sweep_stale(base: &Path) {
    let Some(our_ns) = pid_namespace() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        // A directory without an owner file may be being created right now.
        let Ok(owner) = std::fs::read_to_string(path.join(OWNER_FILE)) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(pid), Some(ns)) = (fields.next(), fields.next()) else {
            continue;
        };
        let creator_alive = Path::new("/proc").join(pid).exists();
        if ns != our_ns || creator_alive || !processes_in(&path).is_empty() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed a stale localpg cluster directory")
            }
            Err(e) => {
                tracing::debug!(dir = %path.display(), error = %e, "could not remove a stale localpg directory")
            }
        }
    }
}
