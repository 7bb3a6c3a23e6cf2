//! Who PostgreSQL processes run as: PostgreSQL refuses to run as root, so when we are root every
//! PostgreSQL program runs as an unprivileged user and the cluster's files are handed to it.

use std::fs::{DirBuilder, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Uid, User};

use super::error::{Error, Result};

const DEFAULT_USER: &str = "nobody";

/// The identity PostgreSQL programs run under.
#[derive(Debug, Clone)]
pub struct RunAs {
    name: String,
    uid: Uid,
    gid: Gid,
    /// True when that identity differs from ours, so children need a uid/gid switch.
    switch: bool,
}

impl RunAs {
    /// As root: `PGRELAY_PG_USER`, else `nobody`. Otherwise: ourselves (the variable is ignored,
    /// since only root can switch users).
    pub fn detect() -> Result<Self> {
        resolve(
            nix::unistd::geteuid(),
            nix::unistd::getegid(),
            std::env::var("PGRELAY_PG_USER").ok(),
        )
    }

    /// The user name PostgreSQL runs as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether PostgreSQL runs as a different user than this process.
    pub fn is_switching(&self) -> bool {
        self.switch
    }

    pub(super) fn apply(&self, cmd: &mut Command) {
        if self.switch {
            cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        }
    }

    /// Creates `path` with mode 0700 owned by the PostgreSQL user; initdb and the server insist
    /// on owning a private data directory.
    pub(super) fn create_private_dir(&self, path: &Path) -> Result<()> {
        DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| Error::io(format!("creating directory {}", path.display()), e))?;
        self.give(path)
    }

    /// Creates (truncating) a file readable only by the PostgreSQL user.
    pub(super) fn create_private_file(&self, path: &Path, contents: &str) -> Result<()> {
        use std::io::Write;
        let mut f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.write_all(contents.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        self.give(path)
    }

    pub(super) fn give(&self, path: &Path) -> Result<()> {
        if self.switch {
            nix::unistd::chown(path, Some(self.uid), Some(self.gid))
                .map_err(|e| Error::io(format!("chown {} to {}", path.display(), self.name), e.into()))?;
        }
        Ok(())
    }

    /// Every ancestor of `dir` must be searchable by the PostgreSQL user, or the server fails
    /// with a confusing "permission denied" deep inside initdb.
    pub(super) fn check_reachable(&self, dir: &Path) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        for ancestor in dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(ancestor) else {
                continue;
            };
            let bit = if meta.uid() == self.uid.as_raw() {
                0o100
            } else if meta.gid() == self.gid.as_raw() {
                0o010
            } else {
                0o001
            };
            if meta.mode() & bit == 0 {
                return Err(Error::DirNotAccessible {
                    dir: ancestor.to_path_buf(),
                    user: self.name.clone(),
                });
            }
        }
        Ok(())
    }
}

pub(super) fn resolve(euid: Uid, egid: Gid, requested: Option<String>) -> Result<RunAs> {
    if !euid.is_root() {
        let name = User::from_uid(euid)
            .ok()
            .flatten()
            .map_or_else(|| euid.to_string(), |u| u.name);
        return Ok(RunAs {
            name,
            uid: euid,
            gid: egid,
            switch: false,
        });
    }
    let name = requested
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_USER.to_string());
    let user = User::from_name(&name)
        .ok()
        .flatten()
        .ok_or_else(|| Error::NoSuchUser { user: name.clone() })?;
    if user.uid.is_root() {
        return Err(Error::RootPgUser { user: name });
    }
    Ok(RunAs {
        name,
        uid: user.uid,
        gid: user.gid,
        switch: true,
    })
}
