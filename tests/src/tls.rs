//! Serving an axum app over TLS on loopback, for the test doubles and the
//! token service.

use std::net::{SocketAddr, TcpListener};

/// A listener on a free loopback port, bound before the app exists (so the app
/// may know its own address).
pub fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local address");
    (listener, addr)
}

/// Serves `app` on `listener` with this certificate; the handle stops it.
pub async fn serve(
    listener: TcpListener,
    cert_pem: &str,
    key_pem: &str,
    app: axum::Router,
) -> axum_server::Handle<SocketAddr> {
    crate::init_crypto();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert_pem.as_bytes().to_vec(),
        key_pem.as_bytes().to_vec(),
    )
    .await
    .expect("a usable TLS certificate");
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .expect("a TLS server")
        .handle(handle.clone());
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    handle
}
