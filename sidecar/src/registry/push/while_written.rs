//! A blob uploaded while it is still being written (pre-copy's layer, put
//! together after the resume): the registry's upload session opened with a
//! POST, the bytes sent in one streamed PATCH as the spool grows (neither
//! size nor digest is needed before it starts), the session closed with a
//! PUT naming the digest once the spool is written. The registry checks that
//! digest against what it received; whatever fails here leaves the upload
//! to the single PUT that follows, from the same spool.

use super::Registry;
use crate::image::spool::SpoolReader;
use anyhow::{Context, Result};
use oci_client::{secrets::RegistryAuth, Client, Reference, RegistryOperation};
use reqwest::{header, RequestBuilder, StatusCode, Url};
use std::future::Future;

/// An upload session whose bytes are all sent.
pub struct Sent {
    /// Where to close it.
    location: Url,
}

/// What a request of the session carries to be let in.
#[derive(Clone)]
struct Access {
    client: Client,
    auth: RegistryAuth,
    target: Reference,
    token: Option<String>,
}

impl Access {
    /// A bearer token from the token service, if the registry has one.
    async fn login(&mut self) -> Result<()> {
        self.token = self
            .client
            .auth(&self.target, &self.auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("logging in to {}", self.target.registry()))?;
        Ok(())
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match (&self.token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        }
    }
}

impl Registry {
    /// Sends the spool's bytes into a new upload session of `target`'s
    /// repository as they are written; the session, once the spool is
    /// written, to be closed with [`Registry::close_upload`]. A task of its
    /// own: it holds nothing of this client.
    pub fn upload_while_written(
        &self,
        target: &Reference,
        spool: SpoolReader,
    ) -> impl Future<Output = Result<Sent>> + Send + 'static {
        let mut access = Access {
            client: self.client.clone(),
            auth: self.auth.clone(),
            target: target.clone(),
            token: None,
        };
        let http = self.http.clone();
        let base = format!("{}://{}", self.scheme(), target.resolve_registry());
        async move {
            access.login().await?;
            let base = Url::parse(&base).with_context(|| format!("{base} is not a URL"))?;
            let start = base
                .join(&format!(
                    "/v2/{}/blobs/uploads/",
                    access.target.repository()
                ))
                .context("the upload's URL")?;
            let response = access
                .authorize(http.post(start))
                .header(header::CONTENT_LENGTH, 0)
                .send()
                .await
                .context("opening an upload session")?;
            let location = next_location(
                &base,
                response,
                StatusCode::ACCEPTED,
                "opening an upload session",
            )
            .await?;
            let response = access
                .authorize(http.patch(location))
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(spool.stream()))
                .send()
                .await
                .context("sending the layer while it is written")?;
            let location =
                next_location(&base, response, StatusCode::ACCEPTED, "sending the layer").await?;
            Ok(Sent { location })
        }
    }

    /// Closes the upload session `sent` as the blob `digest`: the registry
    /// checks the bytes it received against it.
    pub async fn close_upload(&self, target: &Reference, sent: Sent, digest: &str) -> Result<()> {
        let mut access = Access {
            client: self.client.clone(),
            auth: self.auth.clone(),
            target: target.clone(),
            token: None,
        };
        let mut url = sent.location;
        url.query_pairs_mut().append_pair("digest", digest);
        access.login().await?;
        let response = access
            .authorize(self.http.put(url))
            .header(header::CONTENT_LENGTH, 0)
            .send()
            .await
            .context("closing the upload session")?;
        let status = response.status();
        if status == StatusCode::CREATED {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        anyhow::bail!(
            "the registry answered {status} to closing the upload as {digest}: {}",
            body.trim()
        )
    }
}

/// The session's next URL from `response`'s `Location` (relative to `base`
/// or whole), if it answered `expected`.
async fn next_location(
    base: &Url,
    response: reqwest::Response,
    expected: StatusCode,
    doing: &str,
) -> Result<Url> {
    let status = response.status();
    if status != expected {
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        anyhow::bail!("the registry answered {status} to {doing}: {}", body.trim());
    }
    let at = response
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .with_context(|| format!("the registry's answer to {doing} has no Location"))?;
    base.join(at)
        .with_context(|| format!("the registry's Location {at:?} is not a URL"))
}
