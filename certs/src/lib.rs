//! Certificate authority and serving certificates for the admission webhook
//! (and for the test registry), made with rcgen.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use time::{Duration, OffsetDateTime};

/// A certificate authority that can sign serving certificates.
pub struct Authority {
    /// The CA certificate, PEM: what a client trusts (the webhook's caBundle).
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A serving certificate and its private key, both PEM.
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new self-signed CA valid for `days`.
    pub fn new(common_name: &str, days: i64) -> Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's private key, PEM (to sign again later with [`Authority::from_pem`]).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Loads an existing CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("reading the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("reading the CA certificate")?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses), valid for `days`.
    pub fn serving(&self, names: &[String], days: i64) -> Result<Serving> {
        anyhow::ensure!(
            !names.is_empty(),
            "a serving certificate needs at least one name"
        );
        let key = KeyPair::generate().context("generating the serving key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .with_context(|| format!("{n:?} is not a DNS name"))?,
                )),
            })
            .collect::<Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the serving certificate")?;
        Ok(Serving {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
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

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};

    fn verify(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn serving_certificate_is_signed_by_the_ca_for_its_names() {
        let ca = Authority::new("test CA", 2).unwrap();
        let names = service_names("snapshot-webhook", "desktop-snapshot");
        let mut all = names.clone();
        all.push("127.0.0.1".into());
        let serving = ca.serving(&all, 1).unwrap();
        for n in &names {
            verify(&ca.cert_pem, &serving.cert_pem, n).unwrap();
        }
        verify(&ca.cert_pem, &serving.cert_pem, "127.0.0.1").unwrap();
        assert!(verify(&ca.cert_pem, &serving.cert_pem, "other.example").is_err());
        let other = Authority::new("other CA", 2).unwrap();
        assert!(verify(&other.cert_pem, &serving.cert_pem, &names[0]).is_err());
    }

    #[test]
    fn a_reloaded_ca_signs_certificates_the_same_bundle_trusts() {
        let ca = Authority::new("test CA", 2).unwrap();
        let again = Authority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        let serving = again.serving(&["localhost".into()], 1).unwrap();
        verify(&ca.cert_pem, &serving.cert_pem, "localhost").unwrap();
        assert_eq!(ca_bundle(&again.cert_pem), ca_bundle(&ca.cert_pem));
    }
}
