//! pgrelay run as a process of its own (for takeover tests): started with a config file,
//! its stderr in a log file, signalled and waited for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pgrelay process whose stderr goes to a file (a pipe nobody reads would fill up).
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    pub fn start(config: &Path, takeover: Option<&Path>, log: PathBuf) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command.args(["run", "-c"]).arg(config);
        if let Some(path) = takeover {
            command.arg("--takeover").arg(path);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process {
            child: Some(child),
            log,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
    }

    /// Waits for the process to exit; returns its status and its log.
    pub async fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || child.wait().unwrap()))
            .await
            .unwrap_or_else(|_| panic!("pgrelay did not exit in time; its log:\n{}", self.log()))
            .unwrap();
        (status, self.log())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
