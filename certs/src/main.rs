//! `snapshot-certs`: makes the webhook's CA and serving certificate, writes
//! them, and prints the caBundle (optionally writing it into a kustomize patch).

use anyhow::{Context, Result};
use clap::Parser;
use snapshot_certs::{ca_bundle, service_names, Authority};
use std::{fs, path::Path, path::PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "snapshot-certs",
    version,
    about = "CA and serving certificate for snapshot-webhook"
)]
struct Args {
    /// Service name of the webhook.
    #[arg(long, default_value = "snapshot-webhook")]
    service: String,
    /// Namespace of the webhook.
    #[arg(long, default_value = "desktop-snapshot")]
    namespace: String,
    /// Folder to write ca.crt, ca.key, tls.crt and tls.key into.
    #[arg(long, default_value = ".certs")]
    out: PathBuf,
    /// Validity of the certificates, in days.
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// Extra DNS name or IP address of the serving certificate (repeatable).
    #[arg(long = "extra-name")]
    extra_names: Vec<String>,
    /// Sign with the CA already in --out (ca.crt, ca.key) when there is one, so the
    /// caBundle stays the same across a serving-certificate rotation.
    #[arg(long)]
    reuse_ca: bool,
    /// Write a kustomize patch setting the MutatingWebhookConfiguration's caBundle.
    #[arg(long)]
    write_ca_bundle: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("snapshot-certs: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let (ca_crt, ca_key) = (args.out.join("ca.crt"), args.out.join("ca.key"));
    let authority = if args.reuse_ca && ca_crt.exists() && ca_key.exists() {
        eprintln!("reusing the CA in {}", args.out.display());
        let cert =
            fs::read_to_string(&ca_crt).with_context(|| format!("reading {}", ca_crt.display()))?;
        let key =
            fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
        Authority::from_pem(&cert, &key)?
    } else {
        let authority = Authority::new(&format!("{} CA", args.service), args.days.max(1) * 2)?;
        write(&ca_crt, &authority.cert_pem, false)?;
        write(&ca_key, &authority.key_pem(), true)?;
        authority
    };
    let mut names = service_names(&args.service, &args.namespace);
    names.extend(args.extra_names.iter().cloned());
    let serving = authority.serving(&names, args.days)?;
    write(&args.out.join("tls.crt"), &serving.cert_pem, false)?;
    write(&args.out.join("tls.key"), &serving.key_pem, true)?;
    let bundle = ca_bundle(&authority.cert_pem);
    eprintln!(
        "wrote ca.crt, ca.key, tls.crt, tls.key in {} for {}",
        args.out.display(),
        names.join(", ")
    );
    if let Some(patch) = &args.write_ca_bundle {
        write(patch, &ca_bundle_patch(&bundle), false)?;
        eprintln!("wrote the caBundle into {}", patch.display());
    }
    println!("{bundle}");
    Ok(())
}

/// The kustomize patch (JSON 6902, as YAML) that sets the caBundle of the webhook.
fn ca_bundle_patch(bundle: &str) -> String {
    format!(
        "# Written by snapshot-certs (just certs): the CA that signed the webhook's serving certificate.\n\
         - op: replace\n  path: /webhooks/0/clientConfig/caBundle\n  value: {bundle}\n"
    )
}

fn write(path: &Path, content: &str, secret: bool) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", tmp.display()))?;
    }
    let _ = secret;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
