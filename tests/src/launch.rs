//! How a component of ours runs in a test: as a process of this machine, or
//! from its OCI image (built by `just images`) as a container of the test's
//! containerd, the way a cluster runs it. Either way it can be waited for,
//! signalled and killed, synchronously in `Drop` too.

use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::process::Child;

/// A containerd daemon and namespace, enough to drive `ctr` without an async context.
#[derive(Clone, Debug)]
pub struct CtrAddress {
    pub socket: PathBuf,
    pub namespace: String,
}

impl CtrAddress {
    /// `ctr args…` against this daemon and namespace.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ctr");
        c.args(["--connect-timeout", "2s"])
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs `ctr` synchronously; its stdout when it succeeded. Nothing when the
    /// daemon is gone (no waiting for ctr's dial timeout).
    pub fn run(&self, args: &[&str]) -> Option<String> {
        if !self.socket.exists() {
            return None;
        }
        let out = self.command(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The task status of container `id` (RUNNING, STOPPED, …), `None` when it has no task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.run(&["tasks", "ls"])?
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    }

    /// Deletes the stopped task of `id`; how it ended.
    pub fn delete_task(&self, id: &str) -> Ended {
        let out = self.command(&["tasks", "delete", id]).output();
        match out {
            Ok(out) => {
                let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
                let success = out.status.success() && !said.contains("non-zero exit code");
                let how = if success { "exit 0".to_string() } else { said };
                Ended { success, how }
            }
            Err(e) => Ended {
                success: false,
                how: format!("ctr: {e}"),
            },
        }
    }

    /// Kills the task of `id`, then deletes the task and the container.
    pub fn remove(&self, id: &str) {
        let _ = self.run(&["tasks", "kill", "-s", "SIGKILL", id]);
        for _ in 0..40 {
            if self.run(&["tasks", "delete", id]).is_some() || self.task_status(id).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.run(&["tasks", "delete", "--force", id]);
        let _ = self.run(&["containers", "delete", id]);
    }
}

/// How a component ended.
#[derive(Debug)]
pub struct Ended {
    pub success: bool,
    pub how: String,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.how)
    }
}

pub enum Launched {
    Process(Child),
    /// `removed` once killed and deleted, so it is done once.
    Container {
        ctr: CtrAddress,
        id: String,
        removed: bool,
    },
}

impl Launched {
    /// `Some(how)` once it has ended.
    pub fn exited(&mut self) -> Option<Ended> {
        match self {
            Launched::Process(child) => match child.try_wait() {
                Ok(Some(status)) => Some(Ended {
                    success: status.success(),
                    how: status.to_string(),
                }),
                _ => None,
            },
            Launched::Container { removed: true, .. } => Some(Ended {
                success: false,
                how: "killed".into(),
            }),
            Launched::Container { ctr, id, removed } => match ctr.task_status(id).as_deref() {
                Some("RUNNING") | Some("CREATED") | Some("PAUSED") => None,
                None => Some(Ended {
                    success: false,
                    how: "no task".into(),
                }),
                _ => {
                    // deleting a stopped task tells its exit code (on stderr, when not 0)
                    let ended = ctr.delete_task(id);
                    ctr.remove(id);
                    *removed = true;
                    Some(ended)
                }
            },
        }
    }

    /// Sends `signal` (e.g. "TERM"), as the kubelet does when the pod goes.
    pub fn signal(&self, signal: &str) {
        match self {
            Launched::Process(child) => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill")
                        .args([&format!("-{signal}"), &pid.to_string()])
                        .status();
                }
            }
            Launched::Container { ctr, id, .. } => {
                let _ = ctr.run(&["tasks", "kill", "-s", &format!("SIG{signal}"), id]);
            }
        }
    }

    /// Waits until it has ended, at most `limit`; how it ended.
    pub async fn wait(&mut self, limit: Duration) -> Option<Ended> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(how) = self.exited() {
                return Some(how);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it and waits until it is gone, so a temp dir removed right after is
    /// not written to by a dying process. Needs no async context (for `Drop`).
    pub fn kill_and_reap(&mut self) {
        match self {
            Launched::Process(child) => crate::kill_and_reap(child),
            Launched::Container { ctr, id, removed } => {
                if !*removed {
                    ctr.remove(id);
                    *removed = true;
                }
            }
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// The directory `just images` writes the OCI layouts to (`target/images`).
pub fn images_dir() -> PathBuf {
    let mut dir = crate::profile_dir();
    dir.pop();
    dir.join("images")
}

/// The OCI layout of component `name` (snapshot-webhook, snapshot-sidecar), or a
/// panic saying how to build it.
pub fn image_layout(name: &str) -> PathBuf {
    let dir = images_dir().join(name);
    assert!(
        dir.join("index.json").exists(),
        "the {name} image is missing in {}: run `just images` first (`just test` and `just demo` do)",
        dir.display()
    );
    dir
}
