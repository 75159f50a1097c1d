//! `just images`: packs a static binary into a minimal OCI image layout,
//! without a Docker daemon: one layer (the binary, CA roots, an /etc/passwd
//! naming the user, /tmp), a config with the entrypoint and the user, and an
//! index that skopeo can copy (`oci:<dir>:<tag>`).
//!
//! usage: oci-image BINARY NAME TAG UID OUT_DIR

use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression};
use harness::oci::{sha256, tar_header};
use std::{fs, path::Path};

fn main() {
    if let Err(e) = run() {
        eprintln!("oci-image: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [binary, name, tag, uid, out] = args.as_slice() else {
        bail!("usage: oci-image BINARY NAME TAG UID OUT_DIR");
    };
    let uid: u32 = uid.parse().context("UID is a number")?;
    let exe = fs::read(binary).with_context(|| format!("reading {binary}"))?;
    let entrypoint = format!("/usr/local/bin/{name}");

    let mut tar = tar::Builder::new(Vec::new());
    for dir in [
        "etc",
        "etc/ssl",
        "etc/ssl/certs",
        "usr",
        "usr/local",
        "usr/local/bin",
    ] {
        let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    let mut h = tar_header(tar::EntryType::Directory, 0o1777, 0);
    tar.append_data(&mut h, "tmp", std::io::empty())?;
    let mut add = |path: &str, mode: u32, data: &[u8]| -> Result<()> {
        let mut h = tar_header(tar::EntryType::Regular, mode, data.len() as u64);
        tar.append_data(&mut h, path, data)?;
        Ok(())
    };
    add(&entrypoint[1..], 0o755, &exe)?;
    let passwd = "root:x:0:0:root:/:/sbin/nologin
nonroot:x:65532:65532:nonroot:/:/sbin/nologin
";
    add("etc/passwd", 0o644, passwd.as_bytes())?;
    add("etc/group", 0o644, b"root:x:0:\nnonroot:x:65532:\n")?;
    if let Ok(roots) = fs::read("/etc/ssl/certs/ca-certificates.crt") {
        add("etc/ssl/certs/ca-certificates.crt", 0o644, &roots)?;
    }
    let layer_tar = tar.into_inner()?;
    let diff_id = sha256(&layer_tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    std::io::Write::write_all(&mut gz, &layer_tar)?;
    let layer = gz.finish()?;

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Entrypoint": [entrypoint],
            "User": format!("{uid}:{uid}"),
            "Env": ["PATH=/usr/local/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
            "Labels": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": tag}
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "desktop-snapshot oci-image"}]
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}]
    }))?;
    let out = Path::new(out);
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out.join("blobs/sha256"))?;
    for blob in [&layer, &config, &manifest] {
        fs::write(out.join("blobs/sha256").join(&sha256(blob)[7..]), blob)?;
    }
    fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(
        out.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": format!("desktop-snapshot/{name}:{tag}")}
        }]}))?,
    )?;
    let total = layer.len() + config.len() + manifest.len();
    println!(
        "{name}:{tag} -> {} ({:.1} MiB compressed, user {uid})",
        out.display(),
        total as f64 / 1048576.0
    );
    if total > 20 * 1024 * 1024 {
        bail!(
            "{name} is {:.1} MiB, over the 20 MiB budget",
            total as f64 / 1048576.0
        );
    }
    Ok(())
}
