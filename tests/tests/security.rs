//! A desktop user who is root in their own desktop turns nothing of the
//! snapshot path against other users or the node: the real sidecar, a real
//! containerd and registry, and `desktop-probe` (static) in the desktop.

use harness::{
    sidecar::{layers, Rig, Sidecar, RIG_REPO},
    story::Node,
};
use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const REPO: &str = RIG_REPO;

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_desktop_racing_renames_never_gets_a_neighbours_files_into_its_snapshot() {
    let s = Rig::new().await;
    // bob, the neighbour on the same node, with a private key
    s.containerd
        .run_desktop("desk-bob", "pod-bob", "bob-pod", "x-graphical")
        .await;
    const KEY: &str = "BOB-PRIVATE-KEY-7f3a9c";
    const KEY_NAME: &str = "id_bob_7f3a9c";
    s.containerd
        .exec(
            "desk-bob",
            &format!("mkdir -p /root/.ssh && echo {KEY} > /root/.ssh/{KEY_NAME}"),
        )
        .await;
    let bob_upper = s.containerd.upper_dir("desk-bob").await;
    assert!(bob_upper.join("root/.ssh").join(KEY_NAME).exists());

    // alice swaps her own directory with a link to bob's files, as fast as she can:
    // the link's target is where the sidecar sees bob's snapshot
    s.containerd
        .run_hostile_desktop("desk-alice", "pod-alice", &[])
        .await;
    s.containerd
        .exec(
            "desk-alice",
            &format!(
                "mkdir -p /home/a/d/.ssh && echo mine > /home/a/d/.ssh/mine && ln -s {} /home/a/l",
                bob_upper.join("root").display()
            ),
        )
        .await;
    s.containerd
        .exec_detached(
            "desk-alice",
            "/probe swap /home/a/d /home/a/l 900 >/dev/null 2>&1",
        )
        .await;

    /// (what is tried, the sidecar's extra env, how many snapshots)
    type Mode<'a> = (&'a str, &'a [(&'a str, &'a str)], usize);
    let modes: [Mode; 3] = [
        ("pause off", &[("SNAPSHOT_PAUSE", "false")], 50),
        ("pause on", &[], 20),
        (
            "Diff service",
            &[
                ("SNAPSHOT_LAYER_SOURCE", "diff-service"),
                ("SNAPSHOT_PAUSE", "false"),
            ],
            20,
        ),
    ];
    for (mode, env, rounds) in modes {
        let sidecar = Sidecar::start_with(s.target("pod-alice", "alice"), None, env).await;
        let (mut done, mut failed) = (0, 0);
        for _ in 0..rounds {
            let (id, steps) = sidecar.snapshot_with_id().await;
            let (_, answer) = sidecar.get(&format!("/snapshot/{id}")).await;
            for text in steps.iter().chain([&answer.to_string()]) {
                assert!(
                    !text.contains(KEY_NAME) && !text.contains(KEY),
                    "{mode}: an answer names bob's files: {text}"
                );
            }
            if steps.last().map(String::as_str) != Some("done") {
                failed += 1;
                println!("{mode}: ended in error: {:?}", steps.last());
                continue;
            }
            done += 1;
            let tags = s.tags("alice").await;
            let newest = tags.last().expect("a tag after a done snapshot");
            let image = layers(&s.registry, REPO, newest).await;
            let user = image.last().expect("the user's layer");
            for (path, data) in user {
                assert!(
                    !path.contains(KEY_NAME) && !contains(data, KEY),
                    "{mode}: bob's file in alice's snapshot: {path}"
                );
            }
        }
        let log = sidecar.log();
        assert!(
            !log.contains(KEY_NAME) && !log.contains(KEY),
            "{mode}: {log}"
        );
        assert!(
            done > 0,
            "{mode}: no snapshot finished ({failed} failed); log:\n{log}"
        );
        println!("{mode}: {done} snapshots done, {failed} ended in error, none with bob's files");
        sidecar.stop().await;
    }
    // the race ran all along
    let racing = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .any(|cmd| cmd.starts_with(b"/probe\0swap\0"));
    assert!(
        racing,
        "desktop-probe swap is no longer running in alice's desktop"
    );
    s.containerd.stop().await;
}

#[tokio::test]
async fn a_change_past_the_limit_ends_in_error_the_desktop_runs_on_and_nothing_is_kept() {
    let s = Rig::new().await;
    s.containerd
        .run_desktop("desk-a", "pod-a", "a-pod", "x-graphical")
        .await;
    s.containerd
        .exec(
            "desk-a",
            "dd if=/dev/urandom of=/root/big bs=1048576 count=24 2>/dev/null",
        )
        .await;
    let limit = (8u64 << 20).to_string();
    for source in ["auto", "diff-service"] {
        let work = tempfile::tempdir().expect("work dir");
        let work_path = work.path().to_string_lossy().into_owned();
        let sidecar = Sidecar::start_with(
            s.target("pod-a", "alice"),
            None,
            &[
                ("SNAPSHOT_MAX_CHANGE_BYTES", &limit),
                ("SNAPSHOT_LAYER_SOURCE", source),
                ("SNAPSHOT_WORK_DIR", &work_path),
            ],
        )
        .await;
        let steps = sidecar.snapshot_expecting_error().await;
        let last = steps.last().expect("an error");
        assert!(
            last.contains("--max-change-bytes") && last.contains("nothing was pushed"),
            "{source}: {last}"
        );
        assert_eq!(s.containerd.task_status("desk-a").await, "RUNNING");
        assert!(s.tags("alice").await.is_empty(), "{source}: no tag");
        // the spool is gone: nothing in the work dir, no descriptor on it
        let pid = sidecar.pid().expect("a process");
        let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the sidecar's descriptors")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(work.path()))
            .collect();
        assert!(
            held.is_empty(),
            "{source}: the spool is still open: {held:?}"
        );
        assert_eq!(std::fs::read_dir(work.path()).expect("work dir").count(), 0);
        sidecar.stop().await;
    }
    // within the limit, the same desktop is snapshotted
    let sidecar = Sidecar::start_with(
        s.target("pod-a", "alice"),
        None,
        &[("SNAPSHOT_MAX_CHANGE_BYTES", "67108864")],
    )
    .await;
    sidecar.snapshot_done().await;
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM")
}

#[tokio::test]
async fn a_million_entries_in_one_directory_stay_within_the_sidecars_memory_limit() {
    const ENTRIES: usize = 1_000_000;
    let s = Rig::on_tmpfs().await;
    s.containerd
        .run_desktop("desk-a", "pod-a", "a-pod", "x-graphical")
        .await;
    s.containerd.exec("desk-a", "mkdir -p /root/many").await;
    // written straight into the upper directory: the same tree, in seconds
    let many = s.containerd.upper_dir("desk-a").await.join("root/many");
    let clock = std::time::Instant::now();
    let made = tokio::task::spawn_blocking(move || {
        for i in 0..ENTRIES {
            std::fs::File::create(many.join(format!("f{i:07}"))).map(|_| ())?;
        }
        std::io::Result::Ok(())
    })
    .await
    .expect("the writer");
    made.expect("a million empty files");
    println!("made: {:?}", clock.elapsed());
    let sidecar = Sidecar::start(s.target("pod-a", "alice")).await;
    // not a timed test: 57 s alone on 2 cores in the debug build, more beside other tests
    sidecar
        .snapshot_done_within(std::time::Duration::from_secs(900))
        .await;
    println!("snapshot: {:?}", clock.elapsed());
    let peak = peak_rss(sidecar.pid().expect("a process"));
    println!(
        "one directory of {ENTRIES} entries: sidecar peak RSS {} MiB",
        peak >> 20
    );
    assert!(
        peak < 256 << 20,
        "peak RSS {} MiB is over the injected 256Mi limit",
        peak >> 20
    );
    let tags = s.tags("alice").await;
    let image = layers(&s.registry, REPO, &tags[0]).await;
    let files = image
        .last()
        .expect("a user layer")
        .iter()
        .filter(|(p, _)| p.starts_with("root/many/f"))
        .count();
    assert_eq!(files, ENTRIES);
    println!("checked: {:?}", clock.elapsed());
    sidecar.stop().await;
    s.containerd.stop().await;
    println!("stopped: {:?}", clock.elapsed());
}

#[tokio::test]
async fn a_new_snapshot_waits_the_minimum_interval() {
    let s = Rig::new().await;
    s.containerd
        .run_desktop("desk-a", "pod-a", "a-pod", "x-graphical")
        .await;
    let sidecar = Sidecar::start_with(
        s.target("pod-a", "alice"),
        None,
        &[("SNAPSHOT_MIN_INTERVAL", "30s")],
    )
    .await;
    sidecar.snapshot_done().await;
    let r = reqwest::Client::new()
        .post(sidecar.url("/snapshot/snapshot"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 429);
    let answer: serde_json::Value = r.json().await.expect("the envelope");
    assert_eq!(answer["status"], "error");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("the next one can start in"), "{message}");
    assert_eq!(s.tags("alice").await.len(), 1, "no second tag");
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// Names as a user may make them: a newline, terminal escapes.
const ODD_NAMES: [&str; 3] = ["line\nbreak", "\u{1b}[31mred\u{1b}[0m", "bell\u{7}tab\t"];

#[tokio::test]
async fn what_the_user_writes_is_carried_exactly_and_logged_escaped() {
    let s = Rig::new().await;
    s.containerd
        .run_desktop("desk-a", "pod-a", "a-pod", "x-graphical")
        .await;
    s.containerd.exec("desk-a", "mkdir -p /root/odd").await;
    let odd = s.containerd.upper_dir("desk-a").await.join("root/odd");
    for name in ODD_NAMES {
        std::fs::write(odd.join(name), name).expect("an odd name");
    }
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("a path");
    // a device node like /dev/null, a setuid file, an attribute with escapes
    assert_eq!(
        unsafe {
            libc::mknod(
                c(&odd.join("null")).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            )
        },
        0
    );
    std::fs::write(odd.join("suid"), "#!/bin/sh\n").expect("a file");
    std::fs::set_permissions(
        odd.join("suid"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .expect("setuid");
    xattr::set(odd.join("suid"), "user.note", "a\nb\u{1b}[2J".as_bytes()).expect("an attribute");

    // read from the upper directory: every name, mode and attribute exactly
    let sidecar = Sidecar::start(s.target("pod-a", "alice")).await;
    sidecar.snapshot_done().await;
    let tags = s.tags("alice").await;
    let image = layers(&s.registry, REPO, &tags[0]).await;
    let user = image.last().expect("a user layer");
    for name in ODD_NAMES {
        let path = format!("root/odd/{name}");
        let data = user
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, d)| d.as_slice());
        assert_eq!(data, Some(name.as_bytes()), "{path:?} carried exactly");
    }
    assert!(
        user.iter().any(|(p, _)| p == "root/odd/null"),
        "the device node"
    );
    assert!(user.iter().any(|(p, _)| p == "root/odd/suid"));

    // a directory with an overlay attribute a layer cannot carry, named with
    // escapes: the sidecar logs why it uses the Diff service, naming it escaped
    let marked = odd.join("\u{1b}]0;title\u{7}dir");
    std::fs::create_dir(&marked).expect("a dir");
    xattr::set(&marked, "trusted.overlay.opaque", b"x").expect("an overlay attribute");
    sidecar.snapshot_done().await;
    let log = sidecar.log();
    assert!(
        log.contains("cannot be used"),
        "the fallback is logged with its reason:\n{log}"
    );
    for line in log.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(
            parsed.is_ok(),
            "every log line is one JSON object: {line:?}"
        );
        assert!(
            !line.bytes().any(|b| b < 0x20 && b != b'\t'),
            "a raw control character in the log: {line:?}"
        );
    }
    assert!(log.contains(r"\\u{1b}]0;title\\u{7}dir"), "{log}");
    let tags = s.tags("alice").await;
    let image = layers(&s.registry, REPO, &tags[1]).await;
    let user = image.last().expect("a user layer");
    for name in ODD_NAMES {
        let path = format!("root/odd/{name}");
        assert!(
            user.iter().any(|(p, _)| *p == path),
            "{path:?} through the Diff service"
        );
    }
    sidecar.stop().await;
    s.containerd.stop().await;
}

/// What root in a desktop that shares the sidecar's PID namespace tries; each
/// command must fail. `{pid}` is the sidecar as the desktop sees it.
const REACH: [&str; 7] = [
    "cat /proc/{pid}/environ",
    "ls /proc/{pid}/root/",
    "stat {socket_in_root}",
    "cat /proc/{pid}/root/var/run/desktop-snapshot/registry/.dockerconfigjson",
    "busybox readlink /proc/{pid}/fd/1",
    "ls /proc/{pid}/cwd/",
    "/probe ptrace {pid}",
];

#[tokio::test]
async fn a_desktop_in_the_sidecars_pid_namespace_cannot_reach_its_socket_credentials_or_memory() {
    let node = Node::start(&[]).await;
    for with_sys_admin in [true, false] {
        let desktop = node.login("alice").await;
        let sidecar = node
            .sidecar_with(&desktop, &[], |spec| {
                if !with_sys_admin {
                    // as with --containerd-snapshotter-root "": no capability to hold the kernel's check
                    spec.cap_add.clear();
                }
            })
            .await;
        let sidecar_task = format!("snapshot-sidecar-{}", sidecar.port);
        let pid = node.containerd.task_pid(&sidecar_task).await;
        // the kubelet puts every container of a shareProcessNamespace pod in one PID namespace
        let id = format!("hostile-{with_sys_admin}");
        node.containerd
            .run_hostile_desktop(
                &id,
                &format!("pod-hostile-{with_sys_admin}"),
                &["--with-ns".to_string(), format!("pid:/proc/{pid}/ns/pid")],
            )
            .await;
        // the desktop sees the sidecar's process: the namespace is shared
        let seen = node
            .containerd
            .exec(
                &id,
                "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(head -1 $p/status)\"; done",
            )
            .await;
        let inner = seen
            .lines()
            .find(|l| l.contains("snapshot-sideca"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("the sidecar is not visible from the desktop:\n{seen}"))
            .to_string();
        let socket = node.containerd.socket.to_string_lossy().into_owned();
        for attempt in REACH {
            let command = attempt
                .replace("{socket_in_root}", &format!("/proc/{{pid}}/root{socket}"))
                .replace("{pid}", &inner);
            let out = node
                .containerd
                .exec(&id, &format!("if {command} >/tmp/out 2>&1; then echo REACHED; cat /tmp/out; else echo refused; fi"))
                .await;
            assert!(
                out.starts_with("refused"),
                "SYS_ADMIN {with_sys_admin}: `{command}` reached the sidecar:\n{out}"
            );
        }
        // and the sidecar still does its work
        sidecar.snapshot_done().await;
        sidecar.stop().await;
        node.containerd.remove(&id).await;
        node.logoff(desktop).await;
    }
    node.stop().await;
}
