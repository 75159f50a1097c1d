//! The containerd harness itself: a private daemon, the base image, labelled
//! desktop containers, exec, cleanup.

use harness::containerd::Containerd;

#[tokio::test]
async fn a_private_containerd_runs_a_labelled_desktop() {
    let c = Containerd::start().await;
    c.import_base_image().await;
    c.run_desktop("desk-a", "uid-a", "1000-a", "x-graphical")
        .await;
    assert_eq!(c.task_status("desk-a").await, "RUNNING");
    let out = c
        .exec(
            "desk-a",
            "echo hello > /root/hello && cat /root/hello /etc/os-release",
        )
        .await;
    assert!(
        out.contains("hello") && out.contains("desktop-snapshot test base"),
        "{out}"
    );
    let info = c.ctr(&["containers", "info", "desk-a"]).await.unwrap();
    assert!(
        info.contains("io.kubernetes.pod.uid") && info.contains("uid-a"),
        "{info}"
    );
    c.stop().await;
}
