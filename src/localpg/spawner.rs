//! Starts every PostgreSQL child process from one long-lived thread with a parent-death signal,
//! and runs short-lived programs under a deadline.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Test
//! harnesses run each test on its own short-lived thread while a cluster may outlive that test
//! (shared through a static), so forking from the caller's thread would shut servers down under
//! other tests. Forking from one thread that never exits makes the signal mean "the process died",
//! which is exactly the case we need covered: a killed test run must not leave servers behind.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::error::{Error, Result};

struct Request {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<Request> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("pgrelay-localpg-spawner".into())
            .spawn(move || {
                // The static sender is never dropped, so this loop (and thread) lives as long
                // as the process.
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            });
        if let Err(e) = started {
            // `rx` was dropped with the closure: every spawn reports SpawnerGone.
            tracing::error!(error = %e, "could not start the localpg spawner thread");
        }
        tx
    })
}

/// Spawns `cmd` from the spawner thread; the child gets `death_signal` when this process dies.
pub(super) fn spawn(mut cmd: Command, death_signal: Signal) -> Result<Child> {
    let what = describe(&cmd);
    set_parent_death_signal(&mut cmd, death_signal);
    let (reply, answer) = mpsc::channel();
    spawner().send(Request { cmd, reply }).map_err(|_| Error::SpawnerGone)?;
    answer
        .recv()
        .map_err(|_| Error::SpawnerGone)?
        .map_err(|e| Error::io(format!("starting `{what}`"), e))
}

/// std runs `pre_exec` closures after its setgroups/setgid/setuid calls (see `do_exec` in
/// library/std/src/sys/process/unix/unix.rs), which matters: a credential change clears the
/// parent-death signal, so setting it any earlier would be undone for every uid-switched child.
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command, signal: Signal) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed. It makes two system calls (prctl, getppid) and builds io::Errors from raw
    // errno values; nothing allocates, locks, or touches state shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal)?;
            // The parent may have died between fork and prctl; then nobody would signal us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// What a finished short-lived program printed.
#[derive(Debug)]
pub(super) struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a short-lived program to completion, killing it if it exceeds `timeout`.
pub(super) fn run(mut cmd: Command, timeout: Duration) -> Result<Finished> {
    let what = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn(cmd, Signal::SIGKILL)?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::CommandTimedOut {
                    command: what,
                    timeout,
                    log_tail: String::new(),
                });
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(format!("waiting for `{what}`"), e)),
        }
    };
    // A grandchild could keep a pipe open; don't hang on it.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        let bytes = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// `program arg arg...` for error messages.
pub(super) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
