//! The install path as an operator follows it: `just push-images` (scripts/push-images.sh)
//! against a registry of their own, with a private CA and htpasswd credentials (the
//! harness's real registry), by authfile or by user name and password.

use harness::registry::{Registry, PASSWORD, USER};
use std::path::{Path, PathBuf};
use tokio::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .join("scripts/push-images.sh")
}

/// OCI layouts named and tagged as `just images` makes them (of a small binary: the
/// push, not the image, is under test), in a folder of their own.
async fn images(tag: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let oci_image = harness::workspace_binary("oci-image");
    for name in ["snapshot-webhook", "snapshot-sidecar"] {
        let out = Command::new(&oci_image)
            .args(["/bin/true", name, tag, "65532"])
            .arg(dir.path().join(name))
            .output()
            .await
            .expect("running oci-image");
        assert!(
            out.status.success(),
            "oci-image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Runs the script; its exit status and what it wrote on stderr.
async fn push(prefix: &str, tag: &str, images: &Path, env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .args([prefix, tag])
        .env("IMAGES_DIR", images)
        // No credentials from the machine's own files.
        .env("REGISTRY_AUTH_FILE", images.join("no-auth.json"))
        .env_remove("PUSH_REGISTRY_CA")
        .env_remove("PUSH_REGISTRY_AUTHFILE")
        .env_remove("PUSH_REGISTRY_USERNAME")
        .env_remove("PUSH_REGISTRY_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("running push-images.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn push_images_takes_a_private_ca_and_an_authfile() {
    let registry = Registry::start().await;
    let images = images("0.1.0").await;
    let prefix = format!("{}/desktop-snapshot", registry.host);
    let (ca, authfile) = (registry.ca_path(), registry.credentials_file());

    // What the issue saw: the registry's CA is not the machine's.
    let (ok, stderr) = push(&prefix, "0.1.0", images.path(), &[]).await;
    assert!(!ok, "pushed without the registry's CA");
    assert!(stderr.contains("x509"), "{stderr}");
    assert!(stderr.contains("PUSH_REGISTRY_CA"), "{stderr}");

    // The CA alone: the registry wants credentials.
    let (ok, stderr) = push(
        &prefix,
        "0.1.0",
        images.path(),
        &[("PUSH_REGISTRY_CA", &ca)],
    )
    .await;
    assert!(!ok, "pushed without credentials");
    assert!(stderr.contains("PUSH_REGISTRY_AUTHFILE"), "{stderr}");

    // The CA (a file beside the registry's tls.key, which would make skopeo look for a
    // client certificate in that folder: the script hands skopeo a folder holding the
    // CA alone) and the registry secret's .dockerconfigjson.
    assert!(ca.with_file_name("tls.key").exists());
    let (ok, stderr) = push(
        &prefix,
        "0.1.0",
        images.path(),
        &[
            ("PUSH_REGISTRY_CA", &ca),
            ("PUSH_REGISTRY_AUTHFILE", &authfile),
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    for name in ["snapshot-webhook", "snapshot-sidecar"] {
        assert_eq!(
            registry.tags(&format!("desktop-snapshot/{name}")).await,
            ["0.1.0"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn push_images_takes_a_user_name_and_password_by_env() {
    let registry = Registry::start().await;
    let images = images("0.2.0").await;
    let prefix = format!("{}/mirror/desktop-snapshot", registry.host);
    let ca = registry.ca_path();
    let (user, password) = (Path::new(USER), Path::new(PASSWORD));
    let mut cmd_env = vec![
        ("PUSH_REGISTRY_CA", ca.as_path()),
        ("PUSH_REGISTRY_USERNAME", user),
    ];

    // Half the credentials is refused before anything is sent.
    let (ok, stderr) = push(&prefix, "0.2.0", images.path(), &cmd_env).await;
    assert!(!ok);
    assert!(stderr.contains("go together"), "{stderr}");

    cmd_env.push(("PUSH_REGISTRY_PASSWORD", password));
    let (ok, stderr) = push(&prefix, "0.2.0", images.path(), &cmd_env).await;
    assert!(ok, "{stderr}");
    assert!(
        !stderr.contains(PASSWORD),
        "the password in the output: {stderr}"
    );
    for name in ["snapshot-webhook", "snapshot-sidecar"] {
        assert_eq!(
            registry
                .tags(&format!("mirror/desktop-snapshot/{name}"))
                .await,
            ["0.2.0"],
            "{name}"
        );
    }
}
