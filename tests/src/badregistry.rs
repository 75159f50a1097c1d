//! Registries that misbehave. These are the only doubles in the tests: a real
//! registry cannot be made to answer 500, garbage, or nothing at all.

use crate::ports;
use axum::{http::StatusCode, response::IntoResponse, routing::any, Router};
use snapshot_certs::Authority;
use std::{net::SocketAddr, path::PathBuf};

#[derive(Clone, Copy, Debug)]
pub enum Misbehaviour {
    /// Every request gets 500 with a distribution-style error body.
    ServerError,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Accepts the TCP connection and never says a word (not even the TLS handshake).
    Silent,
    /// Nothing listens: connections are refused.
    Refused,
}

pub struct BadRegistry {
    pub host: String,
    pub dir: tempfile::TempDir,
    handle: Option<axum_server::Handle<SocketAddr>>,
    silent: Option<tokio::task::JoinHandle<()>>,
}

impl BadRegistry {
    pub async fn start(kind: Misbehaviour) -> Self {
        crate::init_crypto();
        let dir = tempfile::tempdir().expect("temp dir");
        let authority = Authority::new("bad registry CA", 2).expect("CA");
        std::fs::write(dir.path().join("ca.crt"), &authority.cert_pem).expect("ca.crt");
        let mut handle = None;
        let mut silent = None;
        let host = match kind {
            Misbehaviour::Refused => format!("127.0.0.1:{}", ports::free_port()),
            Misbehaviour::Silent => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                silent = Some(tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Ok((sock, _)) = listener.accept().await {
                        held.push(sock);
                    }
                }));
                addr.to_string()
            }
            Misbehaviour::ServerError | Misbehaviour::Garbage => {
                let serving = authority
                    .serving(&["127.0.0.1".into()], 2)
                    .expect("serving cert");
                let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
                    serving.cert_pem.into_bytes(),
                    serving.key_pem.into_bytes(),
                )
                .await
                .expect("TLS config");
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.set_nonblocking(true).expect("nonblocking");
                let addr = listener.local_addr().expect("addr");
                let app = Router::new().fallback(any(move || async move {
                    match kind {
                        Misbehaviour::ServerError => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            r#"{"errors":[{"code":"UNKNOWN","message":"storage backend down"}]}"#,
                        )
                            .into_response(),
                        _ => (StatusCode::OK, "<html>definitely not a tag list").into_response(),
                    }
                }));
                let h = axum_server::Handle::new();
                let server = axum_server::from_tcp_rustls(listener, tls)
                    .expect("server")
                    .handle(h.clone());
                tokio::spawn(async move {
                    let _ = server.serve(app.into_make_service()).await;
                });
                handle = Some(h);
                addr.to_string()
            }
        };
        Self {
            host,
            dir,
            handle,
            silent,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
}

impl Drop for BadRegistry {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.shutdown();
        }
        if let Some(t) = &self.silent {
            t.abort();
        }
    }
}
