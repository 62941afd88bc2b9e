//! Opening the remote the operator configured: one URL, the credentials of
//! each store from its standard environment variables (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`), retries with backoff, and a bound on the
//! requests in flight at once.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::limit::LimitStore;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreScheme, RetryConfig};

use super::{Remote, RemoteError};

/// Requests to the store in flight at once, across every push and pull.
pub const MAX_REQUESTS: usize = 16;

/// Client settings on top of what the environment sets: a part or blob
/// request may carry tens of MiB, so the whole-request timeout is generous;
/// connecting is not.
const CLIENT: [(ClientConfigKey, &str); 2] =
    [(ClientConfigKey::Timeout, "600s"), (ClientConfigKey::ConnectTimeout, "10s")];

fn retry() -> RetryConfig {
    RetryConfig { max_retries: 6, retry_timeout: Duration::from_secs(90), ..Default::default() }
}

impl Remote {
    /// Opens `url`: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` (and the https forms `object_store` knows),
    /// `file:///absolute/dir` (created if missing), or `http(s)://host/path`
    /// for a WebDAV server.
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        // The stores' HTTP clients take their TLS from the process's default
        // provider: ring, as the edge uses (it names its own provider, so
        // this is the only place the daemon needs a default).
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let bad = |m: String| RemoteError::Config(format!("{url:?}: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                let dir = parsed.to_file_path().map_err(|_| bad("not an absolute file path".into()))?;
                if !dir.exists() {
                    // Snapshot memory holds whatever the guests held: a
                    // directory made here is the daemon's alone.
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&dir)
                        .map_err(|e| bad(format!("create {}: {e}", dir.display())))?;
                }
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?;
                return Ok(Remote { store: Arc::new(LimitStore::new(fs, MAX_REQUESTS)), url: url.to_string() });
            }
            ObjectStoreScheme::AmazonS3 => Arc::new(
                CLIENT
                    .into_iter()
                    .fold(AmazonS3Builder::from_env(), |b, (k, v)| b.with_config(AmazonS3ConfigKey::Client(k), v))
                    .with_retry(retry())
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                CLIENT
                    .into_iter()
                    .fold(GoogleCloudStorageBuilder::from_env(), |b, (k, v)| {
                        b.with_config(GoogleConfigKey::Client(k), v)
                    })
                    .with_retry(retry())
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                CLIENT
                    .into_iter()
                    .fold(MicrosoftAzureBuilder::from_env(), |b, (k, v)| b.with_config(AzureConfigKey::Client(k), v))
                    .with_retry(retry())
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::Http => {
                let base = &parsed[..url::Position::BeforePath];
                Arc::new(
                    HttpBuilder::new()
                        .with_url(base)
                        .with_client_options(
                            ClientOptions::new()
                                .with_timeout(Duration::from_secs(600))
                                .with_connect_timeout(Duration::from_secs(10)),
                        )
                        .with_retry(retry())
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                )
            }
            ObjectStoreScheme::Memory => {
                return Err(bad("an in-memory store forgets everything when the daemon stops".into()));
            }
            other => return Err(bad(format!("{other:?} stores are not supported"))),
        };
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::new(LimitStore::new(store, MAX_REQUESTS))
        } else {
            Arc::new(LimitStore::new(PrefixStore::new(store, prefix), MAX_REQUESTS))
        };
        Ok(Remote { store, url: url.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/remote", dir.path().display());
        assert!(Remote::open(&url).is_ok());
        assert!(dir.path().join("remote").is_dir());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("remote")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "a remote dir made by the daemon is its own");
        for bad in ["memory:///", "ftp://host/x", "not a url", "s3://", "file://host/dir"] {
            assert!(Remote::open(bad).is_err(), "{bad} was accepted");
        }
        // The stores build their clients (and TLS) without touching the network.
        assert!(Remote::open("s3://bucket/prefix").is_ok());
        assert!(Remote::open("https://webdav.example/forkd").is_ok());
    }
}
