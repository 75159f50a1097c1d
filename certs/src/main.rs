//! `snapshot-certs`: makes the webhook's CA and serving certificate, writes
//! them, and prints the caBundle (optionally writing it into a kustomize patch).
//!
//! stdout carries only the base64 caBundle (one line), so that
//! `BUNDLE=$(snapshot-certs ...)` works; every human message goes to stderr.

use anyhow::{Context, Result};
use clap::Parser;
use snapshot_certs::{ca_bundle, service_names, Authority};
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

#[derive(Parser, Debug)]
#[command(
    name = "snapshot-certs",
    version,
    about = "CA and serving certificate for snapshot-webhook",
    long_about = "Makes a CA and the serving certificate of snapshot-webhook's Service, writes \
                  ca.crt, ca.key, tls.crt and tls.key (keys 0600) into --out, and prints the \
                  base64 caBundle of the MutatingWebhookConfiguration on stdout."
)]
struct Args {
    /// Service name of the webhook.
    #[arg(long, default_value = "snapshot-webhook", value_parser = dns_label)]
    service: String,
    /// Namespace of the webhook.
    #[arg(long, default_value = "desktop-snapshot", value_parser = dns_label)]
    namespace: String,
    /// Folder to write ca.crt, ca.key, tls.crt and tls.key into (made 0700 when missing).
    #[arg(long, default_value = ".certs")]
    out: PathBuf,
    /// Validity of the serving certificate, in days (a new CA gets twice as long).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=36_500))]
    days: i64,
    /// Extra DNS name or IP address of the serving certificate, e.g. 127.0.0.1 or
    /// localhost (repeatable).
    #[arg(long = "extra-name", value_name = "NAME")]
    extra_names: Vec<String>,
    /// Sign with the CA already in --out (ca.crt and ca.key) when there is one, so the
    /// caBundle stays the same across a serving-certificate rotation.
    #[arg(long)]
    reuse_ca: bool,
    /// Write a kustomize patch at FILE that sets the caBundle of the
    /// MutatingWebhookConfiguration's webhook (e.g. manifests/base/webhook-cabundle.yaml).
    #[arg(long, value_name = "FILE")]
    write_ca_bundle: Option<PathBuf>,
}

/// A Service or namespace name: an RFC 1123 label, as Kubernetes requires.
fn dns_label(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a Kubernetes name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(bundle) => {
            println!("{bundle}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapshot-certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Does the work and returns the base64 caBundle.
fn run(args: &Args) -> Result<String> {
    make_dir(&args.out)?;
    let (ca_crt, ca_key) = (args.out.join("ca.crt"), args.out.join("ca.key"));
    let authority = match (args.reuse_ca, ca_crt.exists(), ca_key.exists()) {
        (true, true, true) => {
            let cert = fs::read_to_string(&ca_crt)
                .with_context(|| format!("reading {}", ca_crt.display()))?;
            let key = fs::read_to_string(&ca_key)
                .with_context(|| format!("reading {}", ca_key.display()))?;
            let authority = Authority::from_pem(&cert, &key).with_context(|| {
                format!(
                    "--reuse-ca: {} and {} are not a usable CA",
                    ca_crt.display(),
                    ca_key.display()
                )
            })?;
            eprintln!(
                "reusing the CA in {} (valid until {}): the caBundle stays the same",
                args.out.display(),
                authority.not_after().date()
            );
            authority
        }
        (true, true, false) | (true, false, true) => {
            let (found, missing) = if ca_crt.exists() {
                (&ca_crt, &ca_key)
            } else {
                (&ca_key, &ca_crt)
            };
            anyhow::bail!(
                "--reuse-ca: found {} but not {}; restore it, or drop --reuse-ca to make a new CA",
                found.display(),
                missing.display()
            );
        }
        (reuse, crt, key) => {
            if reuse {
                eprintln!("no CA in {} yet: making one", args.out.display());
            } else if crt || key {
                eprintln!(
                    "replacing the CA in {}: the caBundle changes (--reuse-ca keeps it)",
                    args.out.display()
                );
            }
            let authority = Authority::new(
                &format!("{}.{} webhook CA", args.service, args.namespace),
                args.days * 2,
            )?;
            write(&ca_key, &authority.key_pem(), true)?;
            write(&ca_crt, &authority.cert_pem, false)?;
            eprintln!(
                "made a new CA, valid until {}",
                authority.not_after().date()
            );
            authority
        }
    };

    let mut names = service_names(&args.service, &args.namespace);
    names.extend(args.extra_names.iter().cloned());
    let serving = authority
        .serving(&names, args.days)
        .context("making the serving certificate")?;
    if serving.not_after == authority.not_after() {
        eprintln!(
            "warning: the CA expires on {}, before the {} days asked: the serving certificate \
             ends then too; run without --reuse-ca for a new CA (and apply its caBundle)",
            authority.not_after().date(),
            args.days
        );
    }
    write(&args.out.join("tls.key"), &serving.key_pem, true)?;
    write(&args.out.join("tls.crt"), &serving.cert_pem, false)?;
    eprintln!(
        "wrote ca.crt, ca.key, tls.crt, tls.key in {}: serving certificate for {}, valid until {}",
        args.out.display(),
        names.join(", "),
        serving.not_after.date()
    );

    let bundle = ca_bundle(&authority.cert_pem);
    if let Some(patch) = &args.write_ca_bundle {
        write(patch, &ca_bundle_patch(&bundle), false)?;
        eprintln!("wrote the caBundle patch {}", patch.display());
    }
    eprintln!(
        "next: kubectl -n {ns} create secret tls {svc}-tls --cert={dir}/tls.crt --key={dir}/tls.key \
         --dry-run=client -o yaml | kubectl apply -f -",
        ns = args.namespace,
        svc = args.service,
        dir = args.out.display()
    );
    Ok(bundle)
}

/// The kustomize patch (JSON 6902, as YAML) that sets the caBundle of the webhook
/// (manifests/base has one webhook, at index 0).
fn ca_bundle_patch(bundle: &str) -> String {
    format!(
        "# Written by snapshot-certs (just certs): the CA that signed the webhook's serving certificate.\n\
         # Re-run `just certs` to replace it; the cert-manager overlay removes it and lets cert-manager inject the CA.\n\
         - op: replace\n  path: /webhooks/0/clientConfig/caBundle\n  value: \"{bundle}\"\n"
    )
}

/// Makes `dir` (0700 on Unix, since it holds private keys) when it is missing.
fn make_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `content` to `path` through a temporary file renamed over it, so a reader never
/// sees half a file; a `secret` file is created 0600 (never readable by others, not even
/// for a moment).
fn write(path: &Path, content: &str, secret: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            p
        }
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let written = options
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(content.as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(dir: &Path, extra: &[&str]) -> Args {
        let mut argv = vec!["snapshot-certs", "--out", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["snapshot-certs"]).unwrap();
        assert_eq!(
            (a.service.as_str(), a.namespace.as_str(), a.days),
            ("snapshot-webhook", "desktop-snapshot", 365)
        );
        assert_eq!(a.out, PathBuf::from(".certs"));
        for bad in [
            &["--service", "Snapshot_Webhook"][..],
            &["--namespace", ""],
            &["--days", "0"],
            &["--days", "x"],
        ] {
            let argv = std::iter::once("snapshot-certs").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn writes_the_ca_the_serving_certificate_and_the_patch() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        let patch = tmp.path().join("manifests/webhook-cabundle.yaml");
        let bundle = run(&args(
            &out,
            &[
                "--extra-name",
                "127.0.0.1",
                "--extra-name",
                "localhost",
                "--write-ca-bundle",
                patch.to_str().unwrap(),
            ],
        ))
        .unwrap();
        assert_eq!(bundle, ca_bundle(&read(&out, "ca.crt")));
        assert!(!bundle.contains('\n'));
        let patch = fs::read_to_string(&patch).unwrap();
        assert!(
            patch.contains("path: /webhooks/0/clientConfig/caBundle"),
            "{patch}"
        );
        assert!(patch.contains(&format!("value: \"{bundle}\"")), "{patch}");
        for f in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
            assert!(read(&out, f).starts_with("-----BEGIN "), "{f}");
        }
        // The files written are a CA and a certificate it signed.
        Authority::from_pem(&read(&out, "ca.crt"), &read(&out, "ca.key")).unwrap();
        assert!(Authority::from_pem(&read(&out, "tls.crt"), &read(&out, "tls.key")).is_err());
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f: &str| fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode("ca.key"), 0o600);
            assert_eq!(mode("tls.key"), 0o600);
            assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o077, 0);
        }
    }

    #[test]
    fn reuse_ca_keeps_the_bundle_and_a_new_ca_changes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        // --reuse-ca with no CA yet makes one.
        let first = run(&args(out, &["--reuse-ca"])).unwrap();
        let tls = read(out, "tls.crt");
        let again = run(&args(out, &["--reuse-ca", "--days", "30"])).unwrap();
        assert_eq!(first, again);
        assert_ne!(
            tls,
            read(out, "tls.crt"),
            "the serving certificate is renewed"
        );
        let fresh = run(&args(out, &[])).unwrap();
        assert_ne!(first, fresh);
    }

    #[test]
    fn reuse_ca_refuses_half_a_ca_or_a_wrong_key() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        run(&args(out, &[])).unwrap();
        let ca_crt = read(out, "ca.crt");

        fs::remove_file(out.join("ca.key")).unwrap();
        let err = run(&args(out, &["--reuse-ca"])).unwrap_err();
        assert!(format!("{err:#}").contains("but not"), "{err:#}");
        assert_eq!(read(out, "ca.crt"), ca_crt, "nothing is overwritten");

        fs::write(out.join("ca.key"), read(out, "tls.key")).unwrap();
        let err = run(&args(out, &["--reuse-ca"])).unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
    }

    #[test]
    fn a_bad_extra_name_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let err = run(&args(tmp.path(), &["--extra-name", "not a name"])).unwrap_err();
        assert!(format!("{err:#}").contains("not a name"), "{err:#}");
    }
}
