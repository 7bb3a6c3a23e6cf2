//! Reloading the configuration (SIGHUP, admin RELOAD): parse and validate the file,
//! build a new snapshot that keeps every pool whose servers and credentials did not
//! change, and swap it in at once. An invalid file changes nothing.

use std::path::Path;

use crate::config::{self, ConfigErrors};
use crate::metrics::ReloadOutcome;
use crate::runtime::{BuildError, Shared, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload (pgrelay was started without one)")]
    NoFile,
    #[error("the new configuration is invalid, nothing changed:\n{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("the new configuration cannot be used, nothing changed: {0}")]
    Build(#[from] BuildError),
}

/// What a successful reload could not apply without a restart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub needs_restart: Vec<&'static str>,
}

/// Reloads from the file pgrelay was started with.
pub fn reload(shared: &Shared) -> Result<Reloaded, ReloadError> {
    let Some(path) = shared.config_path() else {
        return Err(ReloadError::NoFile);
    };
    // New pools and monitors start their tasks on the workers, also when the admin
    // console (on the control thread) asked for the reload.
    let _workers = shared.workers().map(tokio::runtime::Handle::enter);
    let result = reload_from(shared, &path);
    match &result {
        Ok(reloaded) => {
            shared.metrics.config_reload(ReloadOutcome::Ok);
            tracing::info!(file = %path.display(), needs_restart = ?reloaded.needs_restart, "configuration reloaded");
        }
        Err(error) => {
            shared.metrics.config_reload(ReloadOutcome::Error);
            tracing::error!(file = %path.display(), %error, "configuration reload failed");
        }
    }
    result
}

fn reload_from(shared: &Shared, path: &Path) -> Result<Reloaded, ReloadError> {
    let config = config::load(path)?;
    let old = shared.snapshot();
    let mut needs_restart = Vec::new();
    if config.server.listen != old.config.server.listen {
        needs_restart.push("server.listen");
    }
    if config.server.workers != old.config.server.workers {
        needs_restart.push("server.workers");
    }
    if config.server.metrics_listen != old.config.server.metrics_listen {
        needs_restart.push("server.metrics_listen");
    }
    if config.server.peer_listen != old.config.server.peer_listen {
        needs_restart.push("server.peer_listen");
    }
    if config.server.takeover_socket != old.config.server.takeover_socket {
        needs_restart.push("server.takeover_socket");
    }
    let mut next = Snapshot::build(config, &shared.observers())?;
    // Keys already given out carry the id, and peers would drop cancels for the keys of
    // clients still connected if it changed under them: the id is the process's.
    if next.instance_id != shared.cancel.instance_id() {
        needs_restart.push("server.instance_id");
        tracing::warn!(
            running = shared.cancel.instance_id(),
            in_file = next.instance_id,
            "server.instance_id changed: the running id stays in force until a restart"
        );
    }
    for key in &needs_restart {
        tracing::warn!(key, "changed in the file but takes effect only after a restart");
    }
    next.carry_over(&old);
    next.start_monitors();
    shared.swap(next);
    Ok(Reloaded { needs_restart })
}
