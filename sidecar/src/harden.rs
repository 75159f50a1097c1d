//! What keeps this process its own when a desktop shares its PID namespace
//! (`shareProcessNamespace: true`, root in the desktop on `.sudo` images):
//! a process that is not dumpable cannot be reached through
//! `/proc/<pid>/root`, `/proc/<pid>/cwd`, `/proc/<pid>/fd`, `/proc/<pid>/environ`
//! or `ptrace` by anyone without CAP_SYS_PTRACE, which a desktop does not get.
//! Behind those lie the containerd socket (root on the node) and the registry
//! credentials.

use anyhow::{Context, Result};
use rustix::process::{dumpable_behavior, set_dumpable_behavior, DumpableBehavior};

/// Makes this process not dumpable; fails if the kernel does not take it.
pub fn not_dumpable() -> Result<()> {
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .context("making the process not dumpable (prctl PR_SET_DUMPABLE)")?;
    let now = dumpable_behavior().context("reading PR_GET_DUMPABLE")?;
    anyhow::ensure!(
        now == DumpableBehavior::NotDumpable,
        "the process is still dumpable"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_becomes_not_dumpable() {
        super::not_dumpable().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(!status.is_empty());
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
