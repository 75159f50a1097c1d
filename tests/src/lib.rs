//! Test harness: real components started on loopback for the end-to-end tests
//! and the benchmarks. Every process is killed and every temp dir removed on drop.
//! A component that cannot start is a test failure with its reason, never a skip.

pub mod admission;
pub mod badregistry;
pub mod bench;
pub mod containerd;
pub mod kubeapi;
pub mod kubelet;
pub mod launch;
pub mod oci;
pub mod ports;
pub mod registry;
pub mod sidecar;
pub mod stargz;
pub mod story;
pub mod tls;
pub mod token;
pub mod webhook;

/// Installs the ring crypto provider for rustls (reqwest and oci-client are built without one).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The build's profile folder (`target/<profile>`), found from the running
/// binary (`target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
pub fn profile_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let mut dir = exe.parent().expect("a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A binary of this workspace, built by `cargo build --workspace --bins` in the same profile.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the Justfile's test recipe does)",
        path.display()
    );
    path
}

/// The static `desktop-probe` a hostile desktop runs (built by `just images`
/// for the x86_64-unknown-linux-gnu target, release profile).
pub fn probe_binary() -> std::path::PathBuf {
    let target = profile_dir()
        .parent()
        .expect("the target folder")
        .join("x86_64-unknown-linux-gnu/release/desktop-probe");
    assert!(
        target.exists(),
        "{} is missing: run `just images` first (the Justfile's test recipe does)",
        target.display()
    );
    target
}

/// Kills a child process and waits (up to 2 s) until it is gone, so a temp dir
/// removed right after is not written to by a dying process. For `Drop` impls:
/// it does not need an async context.
pub fn kill_and_reap(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            _ => return,
        }
    }
}
