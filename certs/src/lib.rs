//! Certificate authority and serving certificates for the admission webhook
//! (and for the test registry), made with rcgen.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use std::net::IpAddr;
use time::{Duration, OffsetDateTime};

/// A certificate authority that can sign serving certificates.
pub struct Authority {
    /// The CA certificate, PEM: what a client trusts (the webhook's caBundle).
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

/// A serving certificate and its private key, both PEM.
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    /// End of validity: the one asked for, or the CA's when that comes first.
    pub not_after: OffsetDateTime,
}

impl Authority {
    /// A new self-signed CA valid for `days`.
    pub fn new(common_name: &str, days: i64) -> Result<Self> {
        anyhow::ensure!(
            days >= 1,
            "a CA must be valid for at least one day, not {days}"
        );
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days)?;
        let not_after = params.not_after;
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// The CA's private key, PEM (to sign again later with [`Authority::from_pem`]).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA certificate expires; no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Loads an existing CA from its certificate and key (PEM). Refuses a certificate
    /// that is not a CA, has expired, or does not belong to the key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("reading the CA key")?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("reading the CA certificate: no PEM block")?;
        anyhow::ensure!(
            pem.label == "CERTIFICATE",
            "reading the CA certificate: found a PEM {:?} block, not a CERTIFICATE",
            pem.label
        );
        let x509 = pem
            .parse_x509()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("reading the CA certificate")?;
        anyhow::ensure!(
            x509.is_ca(),
            "the certificate {} is not a CA (no basicConstraints CA:TRUE)",
            x509.subject()
        );
        anyhow::ensure!(
            x509.public_key().raw == key.subject_public_key_info().as_slice(),
            "the CA key does not belong to the CA certificate {}",
            x509.subject()
        );
        let not_after = OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
            .context("reading the CA certificate's expiry")?;
        anyhow::ensure!(
            not_after > OffsetDateTime::now_utc(),
            "the CA certificate {} expired on {not_after}",
            x509.subject()
        );
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("reading the CA certificate")?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer,
            not_after,
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses, duplicates dropped),
    /// valid for `days` or until the CA expires, whichever comes first.
    pub fn serving(&self, names: &[String], days: i64) -> Result<Serving> {
        anyhow::ensure!(
            days >= 1,
            "a serving certificate must be valid for at least one day, not {days}"
        );
        let mut unique: Vec<&str> = Vec::with_capacity(names.len());
        for n in names.iter().map(|n| n.trim()) {
            anyhow::ensure!(!n.is_empty(), "a serving certificate name is empty");
            if !unique.contains(&n) {
                unique.push(n);
            }
        }
        anyhow::ensure!(
            !unique.is_empty(),
            "a serving certificate needs at least one name"
        );
        let key = KeyPair::generate().context("generating the serving key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, unique[0]);
        params.subject_alt_names = unique
            .iter()
            .map(|&n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if is_dns_name(n) => {
                    Ok(SanType::DnsName(n.try_into().with_context(|| {
                        format!("{n:?} is not an ASCII DNS name")
                    })?))
                }
                Err(_) => anyhow::bail!("{n:?} is neither a DNS name nor an IP address"),
            })
            .collect::<Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, days)?;
        params.not_after = params.not_after.min(self.not_after);
        let not_after = params.not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the serving certificate")?;
        Ok(Serving {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// The DNS names kube-apiserver may use to reach a Service.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
    ]
}

/// The base64 caBundle a MutatingWebhookConfiguration carries.
pub fn ca_bundle(ca_pem: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes())
}

/// Checks that `cert_pem` is a serving certificate for `name` that a client trusting
/// exactly the CA certificates of `bundle_pem` (one or more PEM blocks, as a caBundle
/// carries them) accepts now: what kube-apiserver checks before it calls the webhook.
pub fn verify_serving(bundle_pem: &str, cert_pem: &str, name: &str) -> Result<()> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};

    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots
            .add(ca.context("reading the caBundle")?)
            .context("adding a caBundle certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "the caBundle holds no certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .context("building a certificate verifier")?;
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("reading the serving certificate")?;
    let server = ServerName::try_from(name.to_string())
        .with_context(|| format!("{name:?} is not a server name"))?;
    verifier
        .verify_server_cert(&leaf, &[], &server, &[], UnixTime::now())
        .with_context(|| format!("the serving certificate does not verify for {name}"))?;
    Ok(())
}

/// A DNS name a certificate may carry: dot-separated labels of letters, digits and
/// inner dashes, 63 bytes at most each, 253 in all; the first label may be `*`.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        })
}

fn validity(params: &mut CertificateParams, days: i64) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    // Past year 9999 an X.509 time cannot be written; the bound also keeps
    // `Duration::days` away from its overflow.
    params.not_after = Some(days)
        .filter(|&d| d <= 3_660_000)
        .and_then(|d| now.checked_add(Duration::days(d)))
        .filter(|t| t.year() <= 9999)
        .with_context(|| format!("{days} days from now is past the year 9999"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn serving_certificate_is_signed_by_the_ca_for_its_names() {
        let ca = Authority::new("test CA", 2).unwrap();
        let names = service_names("snapshot-webhook", "desktop-snapshot");
        let mut all = names.clone();
        all.push("127.0.0.1".into());
        let serving = ca.serving(&all, 1).unwrap();
        for n in &names {
            verify_serving(&ca.cert_pem, &serving.cert_pem, n).unwrap();
        }
        verify_serving(&ca.cert_pem, &serving.cert_pem, "127.0.0.1").unwrap();
        assert!(verify_serving(&ca.cert_pem, &serving.cert_pem, "other.example").is_err());
        let other = Authority::new("other CA", 2).unwrap();
        assert!(verify_serving(&other.cert_pem, &serving.cert_pem, &names[0]).is_err());
    }

    #[test]
    fn a_bundle_of_two_cas_trusts_the_certificates_of_either() {
        let old = Authority::new("test CA 1", 2).unwrap();
        let new = Authority::new("test CA 2", 2).unwrap();
        let bundle = format!("{}{}", new.cert_pem, old.cert_pem);
        for ca in [&old, &new] {
            let serving = ca.serving(&["localhost".into()], 1).unwrap();
            verify_serving(&bundle, &serving.cert_pem, "localhost").unwrap();
        }
        let serving = new.serving(&["localhost".into()], 1).unwrap();
        let err = verify_serving(&old.cert_pem, &serving.cert_pem, "localhost").unwrap_err();
        assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
        assert!(verify_serving("", &serving.cert_pem, "localhost").is_err());
    }

    #[test]
    fn a_reloaded_ca_signs_certificates_the_same_bundle_trusts() {
        let ca = Authority::new("test CA", 2).unwrap();
        let again = Authority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        let serving = again.serving(&["localhost".into()], 1).unwrap();
        verify_serving(&ca.cert_pem, &serving.cert_pem, "localhost").unwrap();
        assert_eq!(ca_bundle(&again.cert_pem), ca_bundle(&ca.cert_pem));
        assert_eq!(
            again.not_after().unix_timestamp(),
            ca.not_after().unix_timestamp()
        );
    }

    /// The subject alternative names of a PEM certificate, as text.
    fn sans(cert_pem: &str) -> Vec<String> {
        use x509_parser::extensions::GeneralName;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()
                }
                GeneralName::IPAddress(b) => {
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()
                }
                other => panic!("unexpected name {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_serving_certificate_carries_exactly_its_names_once() {
        let ca = Authority::new("test CA", 2).unwrap();
        let mut names = service_names("snapshot-webhook", "desktop-snapshot");
        names.extend(["127.0.0.1", "::1", "localhost", "snapshot-webhook"].map(String::from));
        let serving = ca.serving(&names, 1).unwrap();
        assert_eq!(
            sans(&serving.cert_pem),
            [
                "snapshot-webhook.desktop-snapshot.svc",
                "snapshot-webhook.desktop-snapshot.svc.cluster.local",
                "snapshot-webhook.desktop-snapshot",
                "snapshot-webhook",
                "127.0.0.1",
                "::1",
                "localhost",
            ]
        );
        verify_serving(&ca.cert_pem, &serving.cert_pem, "::1").unwrap();
    }

    #[test]
    fn bad_names_and_lifetimes_are_refused() {
        let ca = Authority::new("test CA", 2).unwrap();
        assert!(ca.serving(&[], 1).is_err());
        assert!(ca.serving(&["".into()], 1).is_err());
        assert!(ca.serving(&["ok.example".into(), " ".into()], 1).is_err());
        let err = ca.serving(&["bad name é".into()], 1).err().unwrap();
        assert!(format!("{err:#}").contains("neither a DNS name"), "{err:#}");
        for bad in [
            "bad name",
            "-dash.example",
            "a..b",
            "x.*.example",
            &"a".repeat(64),
        ] {
            assert!(ca.serving(&[bad.to_string()], 1).is_err(), "{bad:?}");
        }
        assert!(ca.serving(&["*.snapshot.example".into()], 1).is_ok());
        assert!(ca.serving(&["ok.example".into()], 0).is_err());
        assert!(Authority::new("test CA", 0).is_err());
        assert!(Authority::new("test CA", 10_000_000).is_err());
        assert!(Authority::new("test CA", i64::MAX).is_err());
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca() {
        let ca = Authority::new("short CA", 3).unwrap();
        let serving = ca.serving(&["localhost".into()], 365).unwrap();
        assert_eq!(serving.not_after, ca.not_after());
        verify_serving(&ca.cert_pem, &serving.cert_pem, "localhost").unwrap();
        let shorter = ca.serving(&["localhost".into()], 1).unwrap();
        assert!(shorter.not_after < ca.not_after());
    }

    #[test]
    fn from_pem_refuses_a_wrong_key_a_leaf_and_garbage() {
        let ca = Authority::new("test CA", 2).unwrap();
        let other = Authority::new("other CA", 2).unwrap();
        let err = Authority::from_pem(&ca.cert_pem, &other.key_pem())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");

        let leaf = ca.serving(&["localhost".into()], 1).unwrap();
        let err = Authority::from_pem(&leaf.cert_pem, &leaf.key_pem)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("not a CA"), "{err:#}");

        assert!(Authority::from_pem("not a certificate", &ca.key_pem()).is_err());
        assert!(Authority::from_pem(&ca.cert_pem, "not a key").is_err());
        let key_as_cert = Authority::from_pem(&ca.key_pem(), &ca.key_pem())
            .err()
            .unwrap();
        assert!(
            format!("{key_as_cert:#}").contains("not a CERTIFICATE"),
            "{key_as_cert:#}"
        );
    }
}
