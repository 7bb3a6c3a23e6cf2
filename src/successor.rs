//! Starting this process's successor for a takeover on SIGUSR2 (a binary upgrade in place,
//! as nginx and PgBouncer do it): the executable at the path this process was started from,
//! read from disk again so that a replaced binary is the one that runs, with the same
//! arguments and `--takeover PATH`. The successor connects to the takeover socket and does
//! the ordinary exchange; nothing else changes here.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// How this process was started, captured at startup: the path of its executable then
/// (once the file is replaced, `/proc/self/exe` names the deleted one) and its arguments.
#[derive(Debug, Clone)]
pub struct Successor {
    exe: PathBuf,
    args: Vec<OsString>,
    /// The process id of the successor started last while it runs, 0 when none does: a
    /// second SIGUSR2 (an impatient operator, a deploy script that retries) must not start
    /// a second process that races the first for the takeover.
    running: Arc<AtomicU32>,
}

/// What [`Successor::spawn`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Spawned {
    /// Started the successor with this process id.
    Started(u32),
    /// A successor started earlier still runs (taking over, or serving already): none
    /// was started.
    AlreadyRunning(u32),
}

impl Successor {
    /// This process's executable and arguments; `None` if the executable's path is unknown.
    pub fn of_this_process() -> Option<Successor> {
        let exe = std::env::current_exe().ok()?;
        Some(Successor {
            exe: without_deleted_suffix(exe),
            args: std::env::args_os().skip(1).collect(),
            running: Arc::new(AtomicU32::new(0)),
        })
    }

    /// Starts the successor, to take over through `takeover`, unless one started before
    /// still runs. It is not waited for here beyond reaping it: in a process group of its
    /// own (a Ctrl-C meant for this process does not reach it), stdin closed, stdout and
    /// stderr shared. Once it has exited (it failed to take over), another may be started.
    pub fn spawn(&self, takeover: &Path) -> std::io::Result<Spawned> {
        let running = self.running.load(Ordering::Acquire);
        if running != 0 {
            return Ok(Spawned::AlreadyRunning(running));
        }
        let mut child = Command::new(&self.exe)
            .args(arguments(&self.args, takeover.as_os_str()))
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        self.running.store(pid, Ordering::Release);
        // Reaped should it exit while this process still runs (it failed to take over);
        // a detached thread never holds up this process's exit.
        let running = self.running.clone();
        let spawned = std::thread::Builder::new()
            .name("pgrelay-successor".to_owned())
            .spawn(move || {
                match child.wait() {
                    Ok(status) if !status.success() => {
                        tracing::warn!(pid, %status, "the successor exited before taking over: still serving")
                    }
                    Ok(_) | Err(_) => {}
                }
                let _ = running.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
            });
        if let Err(error) = spawned {
            // Unwatched, it would count as running for good: no later SIGUSR2 could start
            // another should it fail.
            self.running.store(0, Ordering::Release);
            tracing::debug!(%error, "cannot watch the successor; it is reaped at exit");
        }
        Ok(Spawned::Started(pid))
    }
}

/// `args` with `--takeover PATH` (any `--takeover` given before replaced by `path`).
fn arguments(args: &[OsString], path: &OsStr) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == "--takeover" {
            skip_value = true;
            continue;
        }
        if arg.as_encoded_bytes().starts_with(b"--takeover=") {
            continue;
        }
        out.push(arg.clone());
    }
    out.push("--takeover".into());
    out.push(path.to_owned());
    out
}

/// Linux names an executable replaced since it started "PATH (deleted)".
fn without_deleted_suffix(exe: PathBuf) -> PathBuf {
    match exe.to_str().and_then(|text| text.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_takeover_path_is_added_once() {
        let path = OsStr::new("/run/pgrelay.sock");
        assert_eq!(
            arguments(&strings(&["run", "-c", "x.toml"]), path),
            strings(&["run", "-c", "x.toml", "--takeover", "/run/pgrelay.sock"])
        );
        assert_eq!(
            arguments(
                &strings(&["--log-format", "json", "run", "--takeover", "/old", "-c", "x.toml"]),
                path
            ),
            strings(&[
                "--log-format",
                "json",
                "run",
                "-c",
                "x.toml",
                "--takeover",
                "/run/pgrelay.sock"
            ])
        );
        assert_eq!(
            arguments(&strings(&["run", "--takeover=/old", "-c", "x.toml"]), path),
            strings(&["run", "-c", "x.toml", "--takeover", "/run/pgrelay.sock"])
        );
    }

    /// Waits until no successor is counted as running.
    fn wait_for_exit(successor: &Successor, pid: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while successor.running.load(Ordering::Acquire) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "successor {pid} is not seen to exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn kill(pid: u32) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    }

    #[test]
    fn no_second_successor_starts_while_the_first_runs() {
        // `sh -c 'exec sleep 30' sh --takeover PATH`: a successor still taking over.
        let successor = Successor {
            exe: PathBuf::from("sh"),
            args: strings(&["-c", "exec sleep 30", "sh"]),
            running: Arc::new(AtomicU32::new(0)),
        };
        let path = Path::new("/nonexistent");
        let Spawned::Started(first) = successor.spawn(path).unwrap() else {
            panic!("nothing ran before")
        };
        assert_eq!(successor.spawn(path).unwrap(), Spawned::AlreadyRunning(first));
        assert_eq!(successor.clone().spawn(path).unwrap(), Spawned::AlreadyRunning(first));

        // Once it has exited (it failed to take over), the next signal starts another.
        kill(first);
        wait_for_exit(&successor, first);
        let Spawned::Started(second) = successor.spawn(path).unwrap() else {
            panic!("the first successor exited: another may start")
        };
        assert_ne!(first, second);
        kill(second);
        wait_for_exit(&successor, second);
    }

    #[test]
    fn a_replaced_executable_is_started_from_its_path() {
        assert_eq!(
            without_deleted_suffix(PathBuf::from("/usr/bin/pgrelay (deleted)")),
            PathBuf::from("/usr/bin/pgrelay")
        );
        assert_eq!(
            without_deleted_suffix(PathBuf::from("/usr/bin/pgrelay")),
            PathBuf::from("/usr/bin/pgrelay")
        );
    }
}
