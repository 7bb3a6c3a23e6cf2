//! Processes the benchmark starts and what it reads about them from /proc: a guard that stops
//! a child (by its own PID, never by name) when dropped, CPU time and resident memory of a PID,
//! the open-files limit, and free loopback ports.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How long a stopped child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A child process that is stopped (SIGTERM, then SIGKILL) when the guard is dropped, so that
/// an early return or a panic anywhere in the benchmark leaves nothing running. Only the PID of
/// the child we spawned is ever signalled; since we have not reaped it yet, that PID cannot
/// belong to anybody else.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    /// Where its stdout and stderr go, shown when it fails.
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `log`. The child also gets
    /// SIGKILL if this process dies without running destructors (e.g. killed with SIGKILL).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        set_parent_death_signal(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("starting {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit by itself; kills it when the limit passes.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!("{} did not finish within {limit:?}; killed it", self.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of its output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGTERM, a grace period, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {pid}) ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a text file ("" if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// PR_SET_PDEATHSIG in the child: a benchmark killed with SIGKILL cannot run its guards, and
/// a proxy left listening would skew the next run. The signal fires when the *thread* that
/// forked exits; the benchmark spawns every process from its main thread, whose end is the end
/// of the process. std applies a uid switch before `pre_exec` closures run, so the setting
/// survives the credential change (which would otherwise clear it).
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Clock ticks per second, the unit of utime/stime in /proc/PID/stat.
#[allow(unsafe_code)]
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// User + system CPU time consumed so far by all threads of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: count fields from
    // the last ')'. After it come field 3 (state) onwards, so utime (14) and stime (15) are the
    // 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("unexpected {path}: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("unexpected {path}: {stat}"))
    };
    Ok(field(11)? + field(12)?)
}

/// CPU time (user + system, in clock ticks) of `root` and all its descendants, including
/// descendants that have exited and been reaped (their time is in their parent's cutime and
/// cstime). For the benchmark's own process this covers pgbench, PostgreSQL with every
/// backend, and both proxies.
pub fn tree_cpu_ticks(root: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    // (pid, ppid, utime + stime + cutime + cstime) of every process we can read.
    let mut procs = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // After the state (skipped): ppid is field 4, utime..cstime are fields 14 to 17.
        if fields.len() > 14 {
            procs.push((pid, fields[0] as u32, fields[10] + fields[11] + fields[12] + fields[13]));
        }
    }
    let mut in_tree = vec![root];
    let mut total = 0;
    let mut i = 0;
    while i < in_tree.len() {
        let parent = in_tree[i];
        for &(pid, ppid, ticks) in &procs {
            if pid == parent {
                total += ticks;
            }
            if ppid == parent && pid != parent {
                in_tree.push(pid);
            }
        }
        i += 1;
    }
    total
}

/// Busy CPU time of the whole machine (all CPUs) in clock ticks, from /proc/stat: user, nice,
/// system, irq, softirq and steal.
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum()
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {path}"))
}

/// Raises the soft open-files limit towards `wanted` (at most the hard limit) and returns the
/// soft limit in force. Children inherit it: pgbench with 1,000 clients, the proxies holding
/// thousands of client sockets, and this process opening the idle clients all need it.
#[allow(unsafe_code)]
pub fn raise_open_files_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    let target = wanted.min(limit.rlim_max);
    if limit.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = target;
        }
    }
    limit.rlim_cur
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it before our
/// child binds it; callers retry with a new port when the child fails to start.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| format!("finding a free port: {e}"))
}
