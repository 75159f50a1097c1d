//! The capture from containerd: [`find`] the desktop's container, then
//! [`commit`] it (lease, pause, read the change, resume), the change read from
//! the overlayfs [`upper`] directory (walked through [`beneath`]) or, as the
//! fallback, through containerd's Diff service; [`lineage`] says what the
//! container's image sits on. A capture's [`record`] (every entry's stamp,
//! no data) tells the next one what changed; [`increment`] picks from it what
//! an incremental layer carries.

pub mod beneath;
pub mod commit;
pub mod find;
pub mod increment;
pub mod lineage;
pub mod precopy;
pub mod record;
pub mod upper;
