//! Background children owned by a test: output to a log file, killed on drop.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::poll_until;

/// A child process started by this test, identified by its PID (never by name).
#[derive(Debug)]
pub struct Bg {
    what: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Bg {
    /// Spawns `cmd` with stdout and stderr appended to `log`, stdin closed.
    pub fn spawn(what: impl Into<String>, mut cmd: Command, log: &Path) -> Self {
        let what = what.into();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        // A separator makes restarts visible in the one log file.
        let _ = writeln!(file, "===== start {what}: {cmd:?}");
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("dup log {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Self {
            what,
            child,
            log: log.to_path_buf(),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the child has written so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `None` while running; the exit status once it has exited (reaped).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `sig` to this child only (by PID), if it is still running.
    pub fn signal(&mut self, sig: i32) {
        if self.is_running() {
            let pid = self.child.id() as i32;
            // SAFETY: kill(2) on the PID of our own unreaped child: the PID cannot have
            // been reused by another process while we have not waited for it.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGTERM, then waits up to `grace`; SIGKILL if it is still running.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        if poll_until(grace, Duration::from_millis(20), || self.try_status()).is_none() {
            self.kill();
        }
        self.wait()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }

    fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let s = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what));
        self.status = Some(s);
        s
    }

    /// Waits until the log contains `needle` (e.g. a "listening" line).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        poll_until(timeout, Duration::from_millis(10), || {
            if self.log().contains(needle) {
                Some(Ok(()))
            } else if !self.is_running() {
                Some(Err(format!(
                    "{} exited ({:?}) before logging {needle:?}:\n{}",
                    self.what,
                    self.status,
                    self.log()
                )))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            Err(format!(
                "{} did not log {needle:?} within {timeout:?}:\n{}",
                self.what,
                self.log()
            ))
        })
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Creates (truncates) a file, panicking with its path on error.
pub fn create_file(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}
