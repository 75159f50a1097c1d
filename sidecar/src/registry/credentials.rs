//! The mounted registry secret (`--registry-credentials`, a
//! `.dockerconfigjson`): read at each snapshot, so a rotated secret is used at
//! the next one, and checked before anything is paused, so a snapshot that
//! cannot be pushed never freezes the desktop.

use anyhow::{Context, Result};
use oci_client::secrets::RegistryAuth;
use std::path::Path;

/// The registry (`host[:port]`) of `repository` (`host[:port]/path`).
pub fn host_of(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

/// The document in `file` and its credentials for the registry of
/// `repository`: the file must exist, be a `.dockerconfigjson` and hold an
/// entry for that registry.
pub async fn read(repository: &str, file: &Path) -> Result<(Vec<u8>, RegistryAuth)> {
    let host = host_of(repository);
    let document = match tokio::fs::read(file).await {
        Ok(document) => document,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no registry credentials for {host}: {} does not exist (is the registry secret in the pod's namespace?)",
            file.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("reading the registry credentials {}", file.display())
            })
        }
    };
    let auth = registry_credentials::required_for(&document, host).with_context(|| {
        format!(
            "the registry credentials {} cannot be used for {host}",
            file.display()
        )
    })?;
    Ok((document, auth))
}

/// Whether `file` holds usable credentials for the registry of `repository`
/// (see [`read`]).
pub async fn check(repository: &str, file: &Path) -> Result<()> {
    read(repository, file).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_must_exist_parse_and_name_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".dockerconfigjson");
        let repository = "reg.example:5000/abcdesktopio/oc.user";
        let write = |doc: &str| std::fs::write(&file, doc).unwrap();
        let error = || async { format!("{:#}", check(repository, &file).await.unwrap_err()) };

        let missing = error().await;
        assert!(
            missing.contains(".dockerconfigjson does not exist")
                && missing.contains("registry secret")
                && missing.contains("reg.example:5000"),
            "{missing}"
        );
        write("not json");
        assert!(error().await.contains("not a .dockerconfigjson"));
        write(r#"{"auths": {"other.example": {"username": "u", "password": "topsecret"}}}"#);
        let other = error().await;
        assert!(
            other.contains("no entry for reg.example:5000") && !other.contains("topsecret"),
            "{other}"
        );
        write(r#"{"auths": {"reg.example:5000": {"username": "u", "password": "topsecret"}}}"#);
        let (_, auth) = read(repository, &file).await.unwrap();
        assert!(matches!(auth, RegistryAuth::Basic(u, _) if u == "u"));
    }

    #[test]
    fn the_registry_is_the_repositorys_first_part() {
        for (repository, host) in [
            ("reg:5000/a/b", "reg:5000"),
            ("reg.example/x", "reg.example"),
            ("reg", "reg"),
        ] {
            assert_eq!(host_of(repository), host);
        }
    }
}
