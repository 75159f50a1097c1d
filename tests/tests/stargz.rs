//! Lazy pulling with the real stargz snapshotter: an eStargz image (made by
//! ctr-remote, the reference writer) mounted from the registry fetching only
//! what is read; a plain gzip image still running through the snapshotter
//! (full download); and the eStargz verifier the harness offers.

use harness::{
    containerd::{base_layer, Containerd},
    oci,
    registry::Registry,
    stargz::{self, Options, Stargz},
};
use sha2::{Digest, Sha256};
use std::time::Instant;

const SMALL: &[u8] = b"hello from a lazily pulled layer\n";

/// `n` pseudo-random bytes (xorshift64*, seeded): incompressible, reproducible.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Imports into `builder` an image `name` of the base layer and a layer with
/// `/data/small.txt` and `/data/big.bin` (`big_size` random bytes); the big file's sha256.
async fn source_image(builder: &Containerd, name: &str, big_size: usize) -> String {
    let big = random_bytes(big_size, 0x5eed ^ big_size as u64);
    let sum = hex::encode(Sha256::digest(&big));
    let data = stargz::layer_tar(&[
        ("data/small.txt", 0o644, SMALL),
        ("data/big.bin", 0o644, &big),
    ])
    .unwrap();
    drop(big);
    let archive = builder.dir.path().join("source.tar");
    oci::Archive {
        name,
        layers: &[base_layer().unwrap(), data],
        ..Default::default()
    }
    .write(&archive)
    .unwrap();
    stargz::import(builder, &archive).await;
    std::fs::remove_file(&archive).unwrap();
    sum
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

#[tokio::test]
async fn an_estargz_image_runs_fetching_only_what_is_read() {
    const BIG: usize = 64 << 20;
    let registry = Registry::start().await;
    let builder = Containerd::start().await;
    let src = format!("{}/lazy/source:1", registry.host);
    let dst = format!("{}/lazy/desktop:esgz", registry.host);
    let sum = source_image(&builder, &src, BIG).await;
    let t = Instant::now();
    stargz::convert_estargz(&builder, &src, &dst).await;
    let convert = t.elapsed();
    stargz::push(&builder, &registry, &dst).await;
    builder.stop().await;
    let layers = stargz::layers(&registry, "lazy/desktop", "esgz").await;
    let data = layers.last().unwrap().clone();
    assert!(
        data.toc_digest.is_some() && data.size > BIG as u64,
        "not an eStargz layer of the big file: {layers:?}"
    );

    let sg = Stargz::start(&registry, Options::lazy()).await;
    let c = Containerd::start_with_stargz(&sg).await;
    let pull = sg.rpull(&c, &registry, &dst).await;
    // the snapshotter's own count of what it received (see harness::stargz)
    let fetched_pull = sg.fetched(&data.digest).await;
    let all_pull: u64 = sg.fetched_now().values().sum();
    let cache_pull = sg.cache_bytes();
    assert!(
        !sg.fuse_mounts().is_empty(),
        "no FUSE mount after rpull:\n{}",
        sg.log()
    );
    assert!(
        fetched_pull > 0 && fetched_pull * 10 < data.size,
        "rpull fetched {fetched_pull} of the {} bytes of the layer",
        data.size
    );

    sg.run(&c, &dst, "lazy-desk").await;
    let t = Instant::now();
    let small = c.exec("lazy-desk", "cat /data/small.txt").await;
    let read_small = t.elapsed();
    assert_eq!(small.as_bytes(), SMALL);
    let fetched_small = sg.fetched(&data.digest).await;
    assert!(
        fetched_small * 10 < data.size,
        "reading a small file fetched {fetched_small} of the {} bytes of the layer",
        data.size
    );

    let t = Instant::now();
    let out = c.exec("lazy-desk", "busybox sha256sum /data/big.bin").await;
    let read_big = t.elapsed();
    assert_eq!(out.split_whitespace().next(), Some(sum.as_str()), "{out}");
    let fetched_big = sg.fetched(&data.digest).await;
    assert!(
        fetched_big >= BIG as u64,
        "the big file was read whole but only {fetched_big} bytes of its layer were fetched"
    );
    let served = stargz::blob_bytes_served(&registry, &data.digest).await;
    let pct = |b: u64| 100.0 * b as f64 / data.size as f64;
    println!(
        "eStargz layer {:.1} MiB (ctr-remote convert {:.1} s): rpull {:.2} s, fetched {fetched_pull} B \
         of the layer ({:.3} %; {all_pull} B of all blobs; cache {cache_pull} B); \
         small file read in {:.2} s, fetched so far {fetched_small} B ({:.3} %); \
         big file read in {:.2} s, fetched {:.1} MiB ({:.1} %; registry's log: {:.1} MiB; cache {:.1} MiB)",
        mib(data.size),
        convert.as_secs_f64(),
        pull.as_secs_f64(),
        pct(fetched_pull),
        read_small.as_secs_f64(),
        pct(fetched_small),
        read_big.as_secs_f64(),
        mib(fetched_big),
        pct(fetched_big),
        mib(served),
        mib(sg.cache_bytes()),
    );
    c.stop().await;
    drop(sg);
}

#[tokio::test]
async fn a_plain_gzip_image_runs_through_the_snapshotter_downloaded_whole() {
    const BIG: usize = 16 << 20;
    let registry = Registry::start().await;
    let builder = Containerd::start().await;
    let image = format!("{}/lazy/plain:gzip", registry.host);
    let sum = source_image(&builder, &image, BIG).await;
    stargz::push(&builder, &registry, &image).await;
    builder.stop().await;
    let layers = stargz::layers(&registry, "lazy/plain", "gzip").await;
    let data = layers.last().unwrap().clone();
    assert!(data.toc_digest.is_none(), "{layers:?}");

    let sg = Stargz::start(&registry, Options::lazy()).await;
    let c = Containerd::start_with_stargz(&sg).await;
    let pull = sg.rpull(&c, &registry, &image).await;
    let served = stargz::blob_bytes_served(&registry, &data.digest).await;
    assert!(
        served >= data.size,
        "a gzip layer is downloaded whole, yet {served} of {} bytes were fetched",
        data.size
    );
    sg.run(&c, &image, "plain-desk").await;
    assert_eq!(
        c.exec("plain-desk", "cat /data/small.txt").await.as_bytes(),
        SMALL
    );
    let out = c
        .exec("plain-desk", "busybox sha256sum /data/big.bin")
        .await;
    assert_eq!(out.split_whitespace().next(), Some(sum.as_str()), "{out}");
    println!(
        "plain gzip layer {:.1} MiB: rpull {:.2} s, the registry sent {:.1} MiB of it \
         (the snapshotter itself {} B); FUSE mounts: {}",
        mib(data.size),
        pull.as_secs_f64(),
        mib(served),
        sg.fetched(&data.digest).await,
        sg.fuse_mounts().len()
    );
    println!(
        "the snapshotter on the gzip layer: {}",
        sg.log()
            .lines()
            .filter(|l| l.contains("magic")
                || l.contains("fallback")
                || l.contains("failed to prepare"))
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    c.stop().await;
    drop(sg);
}

#[tokio::test]
async fn the_verifier_accepts_ctr_remotes_estargz_and_refuses_a_wrong_toc_or_a_flipped_byte() {
    let registry = Registry::start().await;
    let builder = Containerd::start().await;
    let src = format!("{}/verify/source:1", registry.host);
    let dst = format!("{}/verify/desktop:esgz", registry.host);
    // 9 MiB: three 4 MiB chunks in the eStargz layer
    source_image(&builder, &src, 9 << 20).await;
    stargz::convert_estargz(&builder, &src, &dst).await;
    stargz::push(&builder, &registry, &dst).await;
    let layers = stargz::layers(&registry, "verify/desktop", "esgz").await;
    let data = layers.last().unwrap().clone();
    let toc = data.toc_digest.clone().expect("a TOC digest annotation");
    let blob = stargz::pull_blob(&registry, "verify/desktop", &data.digest).await;
    let path = builder.dir.path().join("layer.esgz");
    std::fs::write(&path, &blob).unwrap();

    let report = stargz::verify_estargz(&path, Some(&toc), Some(&data.diff_id)).unwrap();
    assert_eq!(report.toc_digest, toc);
    assert_eq!(report.diff_id, data.diff_id);
    assert!(report.files >= 2 && report.chunks >= 4, "{report:?}");
    // and the one byte of ctr-remote's `.no.prefetch.landmark`
    assert_eq!(report.payload_bytes, (9 << 20) + SMALL.len() as u64 + 1);
    // the base layer, converted too, passes as well
    let base = &layers[0];
    let base_blob = stargz::pull_blob(&registry, "verify/desktop", &base.digest).await;
    let base_path = builder.dir.path().join("base.esgz");
    std::fs::write(&base_path, &base_blob).unwrap();
    stargz::verify_estargz(&base_path, base.toc_digest.as_deref(), Some(&base.diff_id)).unwrap();

    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = stargz::verify_estargz(&path, Some(&wrong), None).unwrap_err();
    assert!(format!("{err:#}").contains("invalid TOC JSON"), "{err:#}");
    let err = stargz::verify_estargz(&path, None, Some(&wrong)).unwrap_err();
    assert!(format!("{err:#}").contains("diff ID"), "{err:#}");
    let mut flipped = blob.clone();
    flipped[blob.len() / 2] ^= 0x55;
    std::fs::write(&path, &flipped).unwrap();
    let err = stargz::verify_estargz(&path, Some(&toc), None).unwrap_err();
    println!("a flipped byte: {err:#}");
    // the plain gzip source layer is no eStargz blob
    let plain = builder.dir.path().join("plain.tar.gz");
    let tar = stargz::layer_tar(&[("x", 0o644, &random_bytes(1 << 20, 7))]).unwrap();
    std::fs::write(&plain, harness::oci::gzip(&tar).unwrap()).unwrap();
    assert!(stargz::verify_estargz(&plain, None, None).is_err());
    builder.stop().await;
}
