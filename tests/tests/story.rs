//! The user story end to end, as `just demo` plays it: login, install,
//! snapshot, log off, login again, the installed files are back. The demo
//! asserts every step; this runs it and checks its verdict.

#[tokio::test]
async fn login_install_snapshot_logoff_login_again() {
    let demo = harness::workspace_binary("demo");
    let out = tokio::process::Command::new(&demo).output().await.expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("the user's files are there: notes 1.0, installed by the user | dark"), "{stdout}");
    assert!(stdout.contains("demo finished"), "{stdout}");
}
