//! Registry credentials from a mounted `.dockerconfigjson` file (the data of a
//! `kubernetes.io/dockerconfigjson` secret). The password never leaves this
//! module except inside `RegistryAuth`, whose Debug output hides it.

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
}

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("not a .dockerconfigjson document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the entry for {registry} has neither username/password nor a valid auth field")]
    Incomplete { registry: String },
    #[error("no entry for {registry}")]
    NoEntry { registry: String },
}

/// The credentials for `registry` (`host[:port]`); anonymous when the file has no entry for it.
pub fn auth_for(document: &[u8], registry: &str) -> Result<RegistryAuth, CredentialsError> {
    Ok(entry_for(document, registry)?.unwrap_or(RegistryAuth::Anonymous))
}

/// The credentials for `registry`, which the file must hold (whoever pushes
/// needs them): [`CredentialsError::NoEntry`] when it has none.
pub fn required_for(document: &[u8], registry: &str) -> Result<RegistryAuth, CredentialsError> {
    entry_for(document, registry)?.ok_or_else(|| CredentialsError::NoEntry {
        registry: registry.to_string(),
    })
}

/// The credentials of the file's entry for `registry`, if it has one.
fn entry_for(document: &[u8], registry: &str) -> Result<Option<RegistryAuth>, CredentialsError> {
    let config: DockerConfig = serde_json::from_slice(document)?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| host_of(k) == registry)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        if !u.is_empty() {
            return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
        }
    }
    entry
        .auth
        .as_deref()
        .and_then(|a| {
            base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| RegistryAuth::Basic(u.to_string(), p.to_string()))
        })
        .map(Some)
        .ok_or_else(|| CredentialsError::Incomplete {
            registry: registry.to_string(),
        })
}

/// `https://host:port/v1/` -> `host:port`: docker config keys come in several forms.
fn host_of(key: &str) -> &str {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> Option<(String, String)> {
        match a {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn entries_table() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3:cret");
        let doc = format!(
            r#"{{"auths": {{
                "reg.example:5000": {{"username": "alice", "password": "pw", "auth": "x", "email": ""}},
                "https://other.example/v1/": {{"auth": "{auth}"}},
                "broken.example": {{"email": "a@b"}}
            }}}}"#
        );
        let d = doc.as_bytes();
        assert_eq!(
            basic(auth_for(d, "reg.example:5000").unwrap()),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            basic(auth_for(d, "other.example").unwrap()),
            Some(("bob".into(), "s3:cret".into()))
        );
        assert!(matches!(
            auth_for(d, "unknown.example").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            auth_for(d, "broken.example"),
            Err(CredentialsError::Incomplete { .. })
        ));
        assert!(matches!(
            auth_for(b"not json", "x"),
            Err(CredentialsError::Json(_))
        ));
        // whoever pushes needs an entry: the same answers, but none is an error
        assert_eq!(
            basic(required_for(d, "reg.example:5000").unwrap()),
            Some(("alice".into(), "pw".into()))
        );
        let none = required_for(d, "unknown.example").unwrap_err();
        assert!(matches!(none, CredentialsError::NoEntry { .. }));
        assert_eq!(none.to_string(), "no entry for unknown.example");
        assert!(matches!(
            required_for(d, "broken.example"),
            Err(CredentialsError::Incomplete { .. })
        ));
        assert!(matches!(
            required_for(b"{}", "x"),
            Err(CredentialsError::NoEntry { .. })
        ));
    }

    #[test]
    fn errors_never_show_the_password() {
        let e = auth_for(
            br#"{"auths": {"r": {"username": "u", "password": "topsecret"}}"#,
            "r",
        )
        .unwrap_err();
        assert!(!e.to_string().contains("topsecret"));
        let a = auth_for(
            br#"{"auths": {"r": {"username": "u", "password": "topsecret"}}}"#,
            "r",
        )
        .unwrap();
        assert!(!format!("{a:?}").contains("topsecret"));
    }
}
