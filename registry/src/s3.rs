//! Blobs in S3-compatible object storage (through `object_store`), so several hosts share
//! one store: `s3://bucket[/prefix]?endpoint=http://host:port&region=...&retry_timeout=S`,
//! with the credentials in `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. A failing request
//! is retried for `retry_timeout` seconds (10 by default), then fails by name.
//!
//! Each host keeps a read-through copy of what it read or wrote in a local directory (a
//! [`LocalDirStore`]), so a blob crosses the network once per host and can be mapped from
//! disk. A blob is written to the object store before it counts as stored, and every read
//! from it is verified against its digest before it is kept or returned.
//!
//! [`BlobStore`] is synchronous and is called from any thread; `object_store` is async, so
//! its calls run on a small runtime of this module's own and the caller waits for them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::{BlobStore, Digest, Error, LocalDirStore, Result};

/// An S3 bucket (and a prefix in it) that blobs live in.
#[derive(Clone)]
pub struct S3Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The URL, for messages.
    shown: String,
}

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lode-s3")
            .enable_all()
            .build()
            .expect("starting the object store's runtime")
    })
}

/// Runs `work` on the object store's runtime and waits for it, from whatever thread.
fn wait<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv().map_err(|_| Error::Unavailable {
        location: "object store".into(),
        message: "it stopped".into(),
    })
}

impl S3Bucket {
    /// Opens `s3://bucket[/prefix]?endpoint=...&region=...`; the credentials come from the
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, None)
    }

    /// [`S3Bucket::open`] with the access key and secret given rather than from the
    /// environment.
    pub fn open_with_keys(url: &str, key: &str, secret: &str) -> Result<Self> {
        Self::open_with(url, Some((key, secret)))
    }

    fn open_with(url: &str, keys: Option<(&str, &str)>) -> Result<Self> {
        let invalid = |why: String| Error::Unavailable {
            location: format!("object store {url}"),
            message: why,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(format!("not a URL: {e}")))?;
        if parsed.scheme() != "s3" {
            return Err(invalid(
                "give an s3://bucket[/prefix]?endpoint=... URL".to_string(),
            ));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid("the URL names no bucket".to_string()))?;
        let mut retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region("us-east-1");
        if let Some((key, secret)) = keys {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        for (key, value) in parsed.query_pairs() {
            builder = match key.as_ref() {
                "endpoint" => builder
                    .with_endpoint(value.as_ref())
                    .with_allow_http(value.starts_with("http://"))
                    .with_virtual_hosted_style_request(false),
                "region" => builder.with_region(value.as_ref()),
                "retry_timeout" => {
                    let seconds = value
                        .parse::<f64>()
                        .ok()
                        .filter(|s| *s >= 0.0 && *s <= 600.0)
                        .ok_or_else(|| {
                            invalid(format!("retry_timeout={value}: give seconds, 0 to 600"))
                        })?;
                    retry.retry_timeout = std::time::Duration::from_secs_f64(seconds);
                    builder
                }
                other => {
                    return Err(invalid(format!(
                        "unknown option {other:?} (endpoint, region and retry_timeout are known)"
                    )));
                }
            };
        }
        let store = builder.with_retry(retry).build().map_err(|e| {
            invalid(format!(
                "{e} (are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set?)"
            ))
        })?;
        let prefix = ObjectPath::from(parsed.path().trim_matches('/'));
        let mut shown = parsed.clone();
        shown.set_query(None);
        Ok(Self {
            store: Arc::new(store),
            prefix,
            shown: format!("object store {shown}"),
        })
    }

    /// The objects under `name` in the prefix, as a blob store kept on this host in `cache`.
    pub fn blobs(&self, name: &str, cache: impl Into<PathBuf>) -> Result<S3BlobStore> {
        Ok(S3BlobStore {
            bucket: self.clone(),
            dir: self.prefix.child(name),
            cache: LocalDirStore::open(cache)?,
        })
    }

    /// Makes the bucket if the store lacks it (SeaweedFS and MinIO take a plain PUT of the
    /// bucket). A bucket that exists already is fine.
    pub fn ensure_bucket(&self) -> Result<()> {
        let probe = self.prefix.child(".lode");
        let store = self.store.clone();
        let shown = self.shown.clone();
        wait(async move {
            store
                .put(&probe, PutPayload::from_static(b"lode\n"))
                .await
                .map(|_| ())
                .map_err(|e| Error::Unavailable {
                    location: shown,
                    message: format!("writing a probe object: {e}"),
                })
        })?
    }

    fn failed(&self, what: &str, e: object_store::Error) -> Error {
        Error::Unavailable {
            location: self.shown.clone(),
            message: format!("{what}: {e}"),
        }
    }
}

/// Blobs in an [`S3Bucket`], read through a local copy.
pub struct S3BlobStore {
    bucket: S3Bucket,
    dir: ObjectPath,
    cache: LocalDirStore,
}

impl S3BlobStore {
    fn path(&self, digest: &Digest) -> ObjectPath {
        self.dir.child(digest.to_string())
    }
}

impl BlobStore for S3BlobStore {
    fn put(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let (store, path) = (self.bucket.store.clone(), self.path(&digest));
        let payload = PutPayload::from(bytes.to_vec());
        // In the shared store first: only then does it count as stored anywhere.
        wait(async move { store.put(&path, payload).await })?
            .map_err(|e| self.bucket.failed(&format!("storing {digest}"), e))?;
        self.cache.put(bytes)?;
        Ok(digest)
    }

    fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        match self.cache.get(digest) {
            Err(Error::NotFound(_)) => {}
            // A copy torn by a crash: fetched again below.
            Err(Error::Corrupt { .. }) => self.cache.forget(digest),
            kept => return kept,
        }
        let (store, path) = (self.bucket.store.clone(), self.path(digest));
        let fetched = wait(async move {
            match store.get(&path).await {
                Ok(object) => object.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?
        .map_err(|e| self.bucket.failed(&format!("reading {digest}"), e))?;
        let bytes = fetched.ok_or_else(|| Error::NotFound(digest.clone()))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(Error::Corrupt {
                digest: digest.clone(),
                actual,
            });
        }
        self.cache.keep_copy(digest, &bytes)?;
        Ok(bytes.to_vec())
    }

    fn has(&self, digest: &Digest) -> Result<bool> {
        if self.cache.has(digest)? {
            return Ok(true);
        }
        self.size(digest).map(|_| true).or_else(|e| match e {
            Error::NotFound(_) => Ok(false),
            e => Err(e),
        })
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        if let Ok(size) = self.cache.size(digest) {
            return Ok(size);
        }
        let (store, path) = (self.bucket.store.clone(), self.path(digest));
        match wait(async move { store.head(&path).await })? {
            Ok(meta) => Ok(meta.size),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(digest.clone())),
            Err(e) => Err(self.bucket.failed(&format!("looking up {digest}"), e)),
        }
    }

    fn local_path(&self, digest: &Digest) -> Option<PathBuf> {
        // Only a copy that checks out now (read-through copies are not flushed, so a crash
        // may have torn one); the caller reads the rest with get.
        self.cache.get(digest).ok()?;
        self.cache.local_path(digest)
    }
}
