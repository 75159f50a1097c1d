//! The serving certificate: loaded from PEM files and swapped in place when
//! the files change (cert-manager renewal, a rotated secret), with no restart
//! and no failed handshake: connections already open keep their session, new
//! ones get the new certificate.

use anyhow::{Context, Result};
use axum_server::tls_rustls::RustlsConfig;
use std::{path::PathBuf, time::Duration};
use tracing::{info, warn};

pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let cert = tokio::fs::read(&self.cert)
            .await
            .with_context(|| format!("reading {}", self.cert.display()))?;
        let key = tokio::fs::read(&self.key)
            .await
            .with_context(|| format!("reading {}", self.key.display()))?;
        Ok((cert, key))
    }

    /// The rustls configuration from the files as they are now.
    pub async fn load(&self) -> Result<RustlsConfig> {
        let (cert, key) = self.read().await?;
        RustlsConfig::from_pem(cert, key)
            .await
            .context("the serving certificate or key is not usable")
    }

    /// Checks the files every `interval` and swaps the certificate when they changed
    /// and the new pair is valid. A half-written or mismatched pair is logged and the
    /// certificate in service is kept.
    pub async fn watch(self, config: RustlsConfig, interval: Duration) {
        let mut last = self.read().await.ok();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let current = match self.read().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot read the serving certificate; keeping the one in service");
                    continue;
                }
            };
            if last.as_ref() == Some(&current) {
                continue;
            }
            match config
                .reload_from_pem(current.0.clone(), current.1.clone())
                .await
            {
                Ok(()) => {
                    info!(cert = %self.cert.display(), "serving certificate reloaded");
                    last = Some(current);
                }
                Err(e) => {
                    warn!(error = %e, "the new serving certificate is not usable yet; keeping the one in service")
                }
            }
        }
    }
}
