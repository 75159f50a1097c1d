//! Progress lines on stderr for long runs: `[12/340] user alice: deleted 3`.
//! Runs of more than [`EVERY_STEP_UP_TO`] steps print about 20 lines (and the last).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs up to this many steps print every step.
pub const EVERY_STEP_UP_TO: usize = 50;

pub struct Progress {
    total: usize,
    done: AtomicUsize,
    quiet: bool,
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Self {
        Self {
            total,
            done: AtomicUsize::new(0),
            quiet,
        }
    }

    /// Counts one step done and says what it did.
    pub fn step(&self, what: impl std::fmt::Display) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let shown =
            self.total <= EVERY_STEP_UP_TO || n == self.total || n % (self.total / 20).max(1) == 0;
        if !self.quiet && shown {
            eprintln!("{}", line(n, self.total, &what.to_string()));
        }
    }
}

fn line(n: usize, total: usize, what: &str) -> String {
    format!("[{n}/{total}] {what}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_shape() {
        assert_eq!(
            super::line(12, 340, "user alice: deleted 3"),
            "[12/340] user alice: deleted 3"
        );
    }
}
