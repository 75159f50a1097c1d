//! `snapshot-certs`: makes the webhook's CA and serving certificate, writes
//! them, and prints the caBundle (optionally writing it into a kustomize patch).
//!
//! stdout carries only the base64 caBundle (one line), so that
//! `BUNDLE=$(snapshot-certs ...)` works; every human message goes to stderr.

use anyhow::{Context, Result};
use clap::Parser;
use snapshot_certs::{ca_bundle, service_names, verify_serving, Authority};
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};
use time::OffsetDateTime;

#[derive(Parser, Debug)]
#[command(
    name = "snapshot-certs",
    version,
    about = "CA and serving certificate for snapshot-webhook",
    long_about = "Makes the serving certificate of snapshot-webhook's Service, signed by the CA \
                  in --out (ca.crt, ca.key; a new one when there is none), writes tls.crt and \
                  tls.key (keys 0600) into --out, and prints the base64 caBundle of the \
                  MutatingWebhookConfiguration on stdout. The CA is kept from run to run, so \
                  the caBundle stays the same; --new-ca and --drop-previous-ca roll it over."
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
    /// Make a new CA although one is in --out: the first step of a CA rollover. The CA
    /// in --out becomes previous-ca.crt and previous-ca.key, the caBundle trusts both,
    /// and the serving certificate is left as it is (renew it with the new CA next).
    /// Without a CA in --out, the same as without the flag.
    #[arg(long, conflicts_with = "drop_previous_ca")]
    new_ca: bool,
    /// The last step of a CA rollover: delete previous-ca.crt and previous-ca.key and
    /// write the caBundle with the current CA alone; the serving certificate is left as
    /// it is, and must already be the current CA's.
    #[arg(long)]
    drop_previous_ca: bool,
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

/// The CA files of the --out folder.
struct CaFiles {
    crt: PathBuf,
    key: PathBuf,
    previous_crt: PathBuf,
    previous_key: PathBuf,
}

impl CaFiles {
    fn in_dir(out: &Path) -> Self {
        Self {
            crt: out.join("ca.crt"),
            key: out.join("ca.key"),
            previous_crt: out.join("previous-ca.crt"),
            previous_key: out.join("previous-ca.key"),
        }
    }

    /// The CA in the folder: none when neither file is there; an error for half a CA
    /// or one that cannot sign (expired, not a CA, the key of another certificate).
    fn current(&self) -> Result<Option<Authority>> {
        match (self.crt.exists(), self.key.exists()) {
            (false, false) => Ok(None),
            (true, true) => {
                let cert = read(&self.crt)?;
                let key = read(&self.key)?;
                let authority = Authority::from_pem(&cert, &key).with_context(|| {
                    format!(
                        "{} and {} are not a usable CA; move them away to start with a new \
                         one (the caBundle then changes at once: see docs/deploying.md)",
                        self.crt.display(),
                        self.key.display()
                    )
                })?;
                Ok(Some(authority))
            }
            (crt, _) => {
                let (found, missing) = if crt {
                    (&self.crt, &self.key)
                } else {
                    (&self.key, &self.crt)
                };
                anyhow::bail!(
                    "found {} but not {}: restore it, or move both away to make a new CA",
                    found.display(),
                    missing.display()
                )
            }
        }
    }

    /// The previous CA's certificate (PEM) while a rollover is under way.
    fn previous(&self) -> Result<Option<String>> {
        if !self.previous_crt.exists() {
            return Ok(None);
        }
        let pem = read(&self.previous_crt)?;
        Ok(Some(if pem.ends_with('\n') { pem } else { pem + "\n" }))
    }

    fn write_new(&self, args: &Args) -> Result<Authority> {
        let name = format!(
            "{}.{} webhook CA {}",
            args.service,
            args.namespace,
            OffsetDateTime::now_utc().unix_timestamp()
        );
        let authority = Authority::new(&name, args.days * 2)?;
        write(&self.key, &authority.key_pem(), true)?;
        write(&self.crt, &authority.cert_pem, false)?;
        eprintln!(
            "made a new CA ({name}), valid until {}",
            authority.not_after().date()
        );
        Ok(authority)
    }
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Does the work and returns the base64 caBundle.
fn run(args: &Args) -> Result<String> {
    make_dir(&args.out)?;
    let files = CaFiles::in_dir(&args.out);
    let current = files.current()?;
    let previous = files.previous()?;
    anyhow::ensure!(
        current.is_some() || previous.is_none(),
        "found {} but no CA beside it: restore ca.crt and ca.key",
        files.previous_crt.display()
    );
    // The CA that signs, the previous CA the caBundle still trusts, and whether the
    // serving certificate is renewed.
    let (authority, previous, renew) = match current {
        None if args.drop_previous_ca => {
            anyhow::bail!("--drop-previous-ca: no CA in {}", args.out.display())
        }
        None => (files.write_new(args)?, None, true),
        Some(old) if args.new_ca => {
            anyhow::ensure!(
                previous.is_none(),
                "a CA rollover is already under way ({} is there): finish it with \
                 --drop-previous-ca before starting another",
                files.previous_crt.display()
            );
            fs::rename(&files.key, &files.previous_key)
                .and_then(|()| fs::rename(&files.crt, &files.previous_crt))
                .with_context(|| format!("moving the CA to {}", files.previous_crt.display()))?;
            let authority = files.write_new(args)?;
            eprintln!(
                "the previous CA is now {}: the caBundle trusts both",
                files.previous_crt.display()
            );
            (authority, Some(old.cert_pem), false)
        }
        Some(ca) if args.drop_previous_ca => (ca, None, false),
        Some(ca) => {
            eprintln!(
                "signing with the CA in {} (valid until {}): the caBundle stays the same",
                args.out.display(),
                ca.not_after().date()
            );
            (ca, previous, true)
        }
    };
    let bundle_pem = format!("{}{}", authority.cert_pem, previous.unwrap_or_default());

    let mut names = service_names(&args.service, &args.namespace);
    names.extend(args.extra_names.iter().cloned());
    let tls_crt = args.out.join("tls.crt");
    if renew {
        let serving = authority
            .serving(&names, args.days)
            .context("making the serving certificate")?;
        verify_serving(&bundle_pem, &serving.cert_pem, &names[0])
            .context("checking the new serving certificate against the caBundle")?;
        if serving.not_after == authority.not_after() {
            eprintln!(
                "warning: the CA expires on {}, before the {} days asked: the serving \
                 certificate ends then too; roll the CA over (--new-ca, docs/deploying.md)",
                authority.not_after().date(),
                args.days
            );
        }
        write(&args.out.join("tls.key"), &serving.key_pem, true)?;
        write(&tls_crt, &serving.cert_pem, false)?;
        eprintln!(
            "wrote tls.crt, tls.key in {}: serving certificate for {}, valid until {}",
            args.out.display(),
            names.join(", "),
            serving.not_after.date()
        );
    } else if tls_crt.exists() {
        // The serving certificate stays: the caBundle written must still trust it.
        verify_serving(&bundle_pem, &read(&tls_crt)?, &names[0]).with_context(|| {
            format!(
                "{} would no longer be trusted by the caBundle: renew it with the current CA \
                 first (just rotate-certs)",
                tls_crt.display()
            )
        })?;
    }
    if args.drop_previous_ca {
        for f in [&files.previous_crt, &files.previous_key] {
            match fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("deleting {}", f.display()))
                }
                _ => {}
            }
        }
        eprintln!("the caBundle trusts the current CA alone");
    }

    let bundle = ca_bundle(&bundle_pem);
    if let Some(patch) = &args.write_ca_bundle {
        write(patch, &ca_bundle_patch(&bundle), false)?;
        eprintln!("wrote the caBundle patch {}", patch.display());
    }
    if renew {
        eprintln!(
            "next: kubectl -n {ns} create secret tls {svc}-tls --cert={dir}/tls.crt \
             --key={dir}/tls.key --dry-run=client -o yaml | kubectl apply -f -",
            ns = args.namespace,
            svc = args.service,
            dir = args.out.display()
        );
    } else {
        eprintln!("next: kubectl apply -k <your kustomization> (the caBundle changed)");
    }
    Ok(bundle)
}

/// The kustomize patch (JSON 6902, as YAML) that sets the caBundle of the webhook
/// (manifests/base has one webhook, at index 0).
fn ca_bundle_patch(bundle: &str) -> String {
    format!(
        "# Written by snapshot-certs (just certs): the CA that signed the webhook's serving certificate.\n\
         # `just certs` keeps the CA, so this stays the same; `just certs --new-ca` rolls the CA over\n\
         # (docs/deploying.md). The cert-manager overlay removes it and lets cert-manager inject the CA.\n\
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

    /// Whether `cert` (a file of `dir`) verifies for the webhook's Service name against
    /// the CA certificates of `bundle` (base64, as the caBundle carries them).
    fn trusted(bundle: &str, dir: &Path, cert: &str) -> bool {
        use base64::Engine;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(bundle)
            .unwrap();
        let name = &service_names("snapshot-webhook", "desktop-snapshot")[0];
        verify_serving(std::str::from_utf8(&pem).unwrap(), &read(dir, cert), name).is_ok()
    }

    #[test]
    fn a_second_run_keeps_the_ca_and_renews_the_serving_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let first = run(&args(out, &[])).unwrap();
        let (ca, tls) = (read(out, "ca.crt"), read(out, "tls.crt"));
        let again = run(&args(out, &["--days", "30"])).unwrap();
        assert_eq!(first, again, "the caBundle stays the same");
        assert_eq!(read(out, "ca.crt"), ca);
        assert_ne!(
            read(out, "tls.crt"),
            tls,
            "the serving certificate is renewed"
        );
        assert!(trusted(&first, out, "tls.crt"));
        assert!(!out.join("previous-ca.crt").exists());
    }

    #[test]
    fn new_ca_rolls_over_in_two_steps_without_a_moment_of_distrust() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let first = run(&args(out, &[])).unwrap();
        let (old_ca, old_tls) = (read(out, "ca.crt"), read(out, "tls.crt"));

        // Step 1: a new CA beside the old one; the caBundle trusts both; the serving
        // certificate the pods have is left alone, and still trusted.
        let both = run(&args(out, &["--new-ca"])).unwrap();
        assert_ne!(read(out, "ca.crt"), old_ca);
        assert_eq!(read(out, "previous-ca.crt"), old_ca);
        assert!(out.join("previous-ca.key").exists());
        assert_eq!(read(out, "tls.crt"), old_tls);
        assert!(trusted(&both, out, "tls.crt"));
        assert!(trusted(&first, out, "tls.crt"));

        // A second rollover cannot start before this one ends.
        let err = run(&args(out, &["--new-ca"])).unwrap_err();
        assert!(format!("{err:#}").contains("already under way"), "{err:#}");
        // Nor can the old CA be dropped while the serving certificate is its.
        let err = run(&args(out, &["--drop-previous-ca"])).unwrap_err();
        assert!(
            format!("{err:#}").contains("no longer be trusted"),
            "{err:#}"
        );
        assert!(out.join("previous-ca.crt").exists());

        // Step 2: the serving certificate renewed, by the new CA: the bundle of both
        // trusts it, the old bundle would not.
        let rotated = run(&args(out, &[])).unwrap();
        assert_eq!(rotated, both);
        assert!(trusted(&both, out, "tls.crt"));
        assert!(!trusted(&first, out, "tls.crt"));

        // Step 3: the old CA dropped; the new one alone trusts the serving certificate.
        let tls = read(out, "tls.crt");
        let last = run(&args(out, &["--drop-previous-ca"])).unwrap();
        assert_eq!(last, ca_bundle(&read(out, "ca.crt")));
        assert!(trusted(&last, out, "tls.crt"));
        assert_eq!(read(out, "tls.crt"), tls, "left as it is");
        assert!(!out.join("previous-ca.crt").exists());
        assert!(!out.join("previous-ca.key").exists());
    }

    #[test]
    fn new_ca_on_an_empty_folder_is_a_first_run() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let bundle = run(&args(out, &["--new-ca"])).unwrap();
        assert!(trusted(&bundle, out, "tls.crt"));
        assert!(!out.join("previous-ca.crt").exists());
        assert!(
            Args::try_parse_from(["snapshot-certs", "--new-ca", "--drop-previous-ca"]).is_err()
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(run(&args(empty.path(), &["--drop-previous-ca"])).is_err());
    }

    #[test]
    fn half_a_ca_or_a_wrong_key_is_refused_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        run(&args(out, &[])).unwrap();
        let ca_crt = read(out, "ca.crt");

        fs::remove_file(out.join("ca.key")).unwrap();
        for extra in [&[][..], &["--new-ca"]] {
            let err = run(&args(out, extra)).unwrap_err();
            assert!(format!("{err:#}").contains("but not"), "{err:#}");
            assert_eq!(read(out, "ca.crt"), ca_crt, "nothing is overwritten");
        }

        fs::write(out.join("ca.key"), read(out, "tls.key")).unwrap();
        let err = run(&args(out, &[])).unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
        assert_eq!(read(out, "ca.crt"), ca_crt, "nothing is overwritten");
    }

    #[test]
    fn a_bad_extra_name_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let err = run(&args(tmp.path(), &["--extra-name", "not a name"])).unwrap_err();
        assert!(format!("{err:#}").contains("not a name"), "{err:#}");
    }
}
