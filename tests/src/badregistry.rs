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
    /// Answers every request correctly (no tags), but only after this long.
    Slow(std::time::Duration),
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
            Misbehaviour::ServerError | Misbehaviour::Garbage | Misbehaviour::Slow(_) => {
                let serving = authority
                    .serving(&["127.0.0.1".into()], 2)
                    .expect("serving cert");
                let (listener, addr) = crate::tls::bind();
                let app = Router::new().fallback(any(move || async move {
                    match kind {
                        Misbehaviour::Slow(delay) => {
                            tokio::time::sleep(delay).await;
                            (StatusCode::OK, r#"{"name":"slow","tags":[]}"#).into_response()
                        }
                        Misbehaviour::ServerError => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            r#"{"errors":[{"code":"UNKNOWN","message":"storage backend down"}]}"#,
                        )
                            .into_response(),
                        _ => (StatusCode::OK, "<html>definitely not a tag list").into_response(),
                    }
                }));
                let h = crate::tls::serve(listener, &serving.cert_pem, &serving.key_pem, app).await;
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

/// A TLS proxy in front of a real registry that forwards everything but the
/// requests `fail` picks, which get 500: a registry failing in the middle of a
/// push, which a real one cannot be made to do on demand.
pub struct FailingProxy {
    pub host: String,
    pub dir: tempfile::TempDir,
    handle: axum_server::Handle<SocketAddr>,
}

impl FailingProxy {
    pub async fn start(upstream: &crate::registry::Registry, fail: fn(&str, &str) -> bool) -> Self {
        use axum::{body::Bytes, extract::Request};
        crate::init_crypto();
        let dir = tempfile::tempdir().expect("temp dir");
        let authority = Authority::new("proxy CA", 2).expect("CA");
        std::fs::write(dir.path().join("ca.crt"), &authority.cert_pem).expect("ca.crt");
        let serving = authority
            .serving(&["127.0.0.1".into()], 2)
            .expect("serving cert");
        let (listener, addr) = crate::tls::bind();
        let host = addr.to_string();
        let client = upstream.http_client();
        let (up, me) = (upstream.host.clone(), host.clone());
        let app = Router::new().fallback(any(move |request: Request| {
            let (client, up, me) = (client.clone(), up.clone(), me.clone());
            async move {
                let method = request.method().as_str().to_string();
                let path = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                if fail(&method, &path) {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        r#"{"errors":[{"code":"UNKNOWN","message":"disk full"}]}"#,
                    )
                        .into_response();
                }
                let headers = request.headers().clone();
                let body: Bytes = axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .unwrap_or_default();
                let mut forward = client.request(
                    method.parse().expect("method"),
                    format!("https://{up}{path}"),
                );
                for (k, v) in headers
                    .iter()
                    .filter(|(k, _)| *k != "host" && *k != "content-length")
                {
                    forward = forward.header(k.as_str(), v.as_bytes());
                }
                match forward.body(body).send().await {
                    Ok(r) => {
                        let status = StatusCode::from_u16(r.status().as_u16())
                            .unwrap_or(StatusCode::BAD_GATEWAY);
                        let mut out = axum::http::HeaderMap::new();
                        for (k, v) in r.headers() {
                            let v = v.to_str().unwrap_or_default().replace(&up, &me);
                            if let (Ok(k), Ok(v)) = (
                                axum::http::HeaderName::from_bytes(k.as_str().as_bytes()),
                                v.parse(),
                            ) {
                                out.insert(k, v);
                            }
                        }
                        let body = r.bytes().await.unwrap_or_default();
                        (status, out, body).into_response()
                    }
                    Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
                }
            }
        }));
        let handle = crate::tls::serve(listener, &serving.cert_pem, &serving.key_pem, app).await;
        Self { host, dir, handle }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
}

impl Drop for FailingProxy {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}
