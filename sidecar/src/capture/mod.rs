//! The capture from containerd: [`find`] the desktop's container, then
//! [`commit`] it (lease, pause, read the change, resume), the change read from
//! the overlayfs [`upper`] directory (walked through [`beneath`]) or, as the
//! fallback, through containerd's Diff service; [`lineage`] says what the
//! container's image sits on.

pub mod beneath;
pub mod commit;
pub mod find;
pub mod lineage;
pub mod upper;
