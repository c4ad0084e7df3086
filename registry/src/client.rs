//! The registry client: one HTTP/2 connection shared by every call, a timeout on each call,
//! retries with exponential backoff on transient failures, and a digest check on everything
//! it receives.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::access::BlobAccess;
use crate::proto::registry_client::RegistryClient as Grpc;
use crate::proto::{
    BlobHeader, DeleteTagRequest, Expected, GetBlobRequest, GetIndexRequest, GetTagRequest,
    HasBlobsRequest, ListTagsRequest, PutBlobRequest, PutIndexRequest, SetTagRequest,
    put_blob_request::Part,
};
use crate::tags::TagUpdate;
use crate::{Digest, Error, Result};

/// Bytes per `PutBlob` data message.
const PUT_FRAME: usize = 1 << 20;
/// Digests per `HasBlobs` call (32 bytes each, well under the message limit).
const HAS_BATCH: usize = 8192;

/// Timeouts, retries and parallelism for [`RegistryClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit on each call, retries not included.
    pub call_timeout: Duration,
    /// Limit on opening the connection.
    pub connect_timeout: Duration,
    /// Extra attempts after a transient failure (unavailable, timed out, overloaded).
    pub retries: u32,
    /// Wait before the first retry; it doubles each time.
    pub backoff: Duration,
    /// Transfers to keep in flight at once.
    pub parallelism: usize,
    /// Largest message accepted, which bounds indexes.
    pub max_message: usize,
    /// Largest blob accepted from a registry, so a hostile one cannot exhaust memory.
    pub max_blob: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            retries: 4,
            backoff: Duration::from_millis(100),
            parallelism: 16,
            max_message: 64 << 20,
            max_blob: 256 << 20,
        }
    }
}

/// A connection to a registry at `http://HOST:PORT`.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    url: String,
    grpc: Grpc<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    options: ClientOptions,
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
    )
}

impl RegistryClient {
    /// Prepares a client; the connection opens on the first call, so a registry that is down
    /// is reported by that call with its URL.
    pub fn new(url: &str, token: Option<&str>, options: ClientOptions) -> Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        let invalid = |message: String| Error::Remote {
            url: url.clone(),
            op: "connect",
            code: Code::InvalidArgument,
            message,
        };
        if !url.starts_with("http://") {
            return Err(invalid(
                "registry URLs look like http://HOST:PORT (TLS is not supported yet; put the \
                 registry behind a TLS-terminating proxy on the same host)"
                    .into(),
            ));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| invalid(format!("not a valid URL: {e}")))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONNECTION_WINDOW);
        let grpc = Grpc::new(endpoint.connect_lazy())
            .max_decoding_message_size(options.max_message)
            .max_encoding_message_size(options.max_message);
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| invalid("the token holds characters a header cannot".into()))
            })
            .transpose()?;
        Ok(Self {
            url,
            grpc,
            token,
            options,
        })
    }

    /// The registry's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    fn error(&self, op: &'static str, status: Status) -> Error {
        let mut message = status.message().to_string();
        let mut cause = std::error::Error::source(&status);
        while let Some(error) = cause {
            let text = error.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            cause = error.source();
        }
        if status.code() == Code::Unavailable {
            message = format!(
                "{message} (is the registry running? Start one with `lode serve` or `lode \
                 registry serve`, or point --registry / LODE_REGISTRY at it)"
            );
        }
        Error::Remote {
            url: self.url.clone(),
            op,
            code: status.code(),
            message,
        }
    }

    /// Runs one call with a timeout, retrying transient failures with backoff.
    async fn call<T, F, Fut>(&self, op: &'static str, attempt: F) -> Result<T>
    where
        F: FnMut(Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_with_retries(op, self.options.retries, attempt)
            .await
    }

    /// Like `call`, with its own retry count: conditional tag updates are not idempotent
    /// (a retry after a lost reply would report a conflict with itself), so they get none.
    async fn call_with_retries<T, F, Fut>(
        &self,
        op: &'static str,
        retries: u32,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut tries = 0;
        loop {
            let outcome =
                tokio::time::timeout(self.options.call_timeout, attempt(self.grpc.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "no answer within {:?}",
                            self.options.call_timeout
                        )))
                    });
            match outcome {
                Ok(value) => return Ok(value),
                Err(status) if tries < retries && retryable(status.code()) => {
                    let delay = self.options.backoff * 2u32.pow(tries);
                    tracing::debug!(op, %status, ?delay, "retrying registry call");
                    tokio::time::sleep(delay).await;
                    tries += 1;
                }
                Err(status) => return Err(self.error(op, status)),
            }
        }
    }

    /// Reads `digest` from `offset` to the end, appending to `buffer`; used so a retry resumes
    /// where a broken stream stopped.
    async fn fetch_into(
        &self,
        grpc: &mut Grpc<Channel>,
        digest: &Digest,
        buffer: &mut BytesMut,
    ) -> Result<(), Status> {
        let mut stream = grpc
            .get_blob(self.request(GetBlobRequest {
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                offset: buffer.len() as u64,
                length: 0,
            }))
            .await?
            .into_inner();
        let mut total = None;
        while let Some(message) = stream.message().await? {
            if message.total_size > self.options.max_blob {
                return Err(Status::out_of_range(format!(
                    "blob {digest} is {} bytes, over this client's limit of {} bytes",
                    message.total_size, self.options.max_blob
                )));
            }
            if *total.get_or_insert(message.total_size) != message.total_size {
                return Err(Status::data_loss(format!(
                    "the registry changed the size of {digest} mid-stream"
                )));
            }
            // Sized once from the first message, so frames are copied in without regrowing.
            let remaining = message.total_size.saturating_sub(buffer.len() as u64);
            buffer.reserve(usize::try_from(remaining).unwrap_or(0).min(64 << 20));
            buffer.extend_from_slice(&message.data);
            if buffer.len() as u64 > message.total_size {
                return Err(Status::data_loss(format!(
                    "registry sent more bytes for {digest} than its size"
                )));
            }
        }
        Ok(())
    }

    /// Reads `length` bytes of a blob from `offset` (0 reads to the end). A range cannot be
    /// checked against the blob's digest; callers that need integrity fetch whole blobs.
    pub async fn get_range(&self, digest: &Digest, offset: u64, length: u64) -> Result<Bytes> {
        self.call("GetBlob", |mut grpc| async move {
            let mut stream = grpc
                .get_blob(self.request(GetBlobRequest {
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    offset,
                    length,
                }))
                .await?
                .into_inner();
            let mut buffer = BytesMut::new();
            while let Some(message) = stream.message().await? {
                buffer.extend_from_slice(&message.data);
            }
            Ok(buffer.freeze())
        })
        .await
    }

    fn tag_retries(&self, condition: &TagUpdate) -> u32 {
        match condition {
            TagUpdate::Always => self.options.retries,
            TagUpdate::IfAbsent | TagUpdate::IfEquals(_) => 0,
        }
    }

    /// Removes a tag, optionally only if it points where the caller expects.
    pub async fn delete_tag(&self, name: &str, condition: TagUpdate) -> Result<()> {
        // Never retried: a retry after a lost reply would find the tag gone.
        self.call_with_retries("DeleteTag", 0, |mut grpc| {
            let request = self.request(DeleteTagRequest {
                name: name.to_string(),
                expected: expected_of(&condition),
            });
            async move { grpc.delete_tag(request).await.map(|_| ()) }
        })
        .await
    }
}

fn expected_of(condition: &TagUpdate) -> Option<Expected> {
    match condition {
        TagUpdate::Always => None,
        TagUpdate::IfAbsent => Some(Expected {
            digest: Bytes::new(),
        }),
        TagUpdate::IfEquals(digest) => Some(Expected {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
        }),
    }
}

fn digest_from(url: &str, op: &'static str, bytes: &[u8]) -> Result<Digest> {
    Digest::from_slice(bytes).map_err(|_| Error::Remote {
        url: url.to_string(),
        op,
        code: Code::Internal,
        message: format!("the registry answered a {}-byte digest", bytes.len()),
    })
}

#[async_trait]
impl BlobAccess for RegistryClient {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn parallelism(&self) -> usize {
        self.options.parallelism
    }

    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        for batch in digests.chunks(HAS_BATCH) {
            let wire: Vec<Bytes> = batch
                .iter()
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .collect();
            let response = self
                .call("HasBlobs", |mut grpc| {
                    let request = self.request(HasBlobsRequest {
                        digests: wire.clone(),
                    });
                    async move { grpc.has_blobs(request).await }
                })
                .await?;
            for digest in response.into_inner().missing {
                missing.push(digest_from(&self.url, "HasBlobs", &digest)?);
            }
        }
        Ok(missing)
    }

    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<bool> {
        let response = self
            .call("PutBlob", |mut grpc| {
                let mut messages = vec![PutBlobRequest {
                    part: Some(Part::Header(BlobHeader {
                        digest: Bytes::copy_from_slice(digest.as_bytes()),
                        size: bytes.len() as u64,
                    })),
                }];
                messages.extend(
                    (0..bytes.len())
                        .step_by(PUT_FRAME)
                        .map(|start| PutBlobRequest {
                            part: Some(Part::Data(
                                bytes.slice(start..(start + PUT_FRAME).min(bytes.len())),
                            )),
                        }),
                );
                let request = self.request(futures::stream::iter(messages));
                async move { grpc.put_blob(request).await }
            })
            .await?;
        Ok(response.into_inner().existed)
    }

    async fn get_blob(&self, digest: &Digest) -> Result<Bytes> {
        // Each attempt resumes after the bytes already received.
        let buffer = tokio::sync::Mutex::new(BytesMut::new());
        self.call("GetBlob", |mut grpc| {
            let buffer = &buffer;
            async move {
                let mut received = buffer.lock().await;
                self.fetch_into(&mut grpc, digest, &mut received).await
            }
        })
        .await?;
        let buffer = buffer.into_inner();
        digest.verify(&buffer)?;
        Ok(buffer.freeze())
    }

    async fn put_index(&self, digest: &Digest, bytes: Bytes) -> Result<bool> {
        let response = self
            .call("PutIndex", |mut grpc| {
                let request = self.request(PutIndexRequest {
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    data: bytes.clone(),
                });
                async move { grpc.put_index(request).await }
            })
            .await?;
        Ok(response.into_inner().existed)
    }

    async fn get_index(&self, digest: &Digest) -> Result<Bytes> {
        let response = self
            .call("GetIndex", |mut grpc| {
                let request = self.request(GetIndexRequest {
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                });
                async move { grpc.get_index(request).await }
            })
            .await
            .map_err(|e| match e {
                Error::Remote {
                    code: Code::NotFound,
                    ..
                } => Error::IndexNotFound(digest.clone()),
                other => other,
            })?;
        let data = response.into_inner().data;
        digest.verify(&data)?;
        Ok(data)
    }

    async fn get_tag(&self, name: &str) -> Result<Digest> {
        let response = self
            .call("GetTag", |mut grpc| {
                let request = self.request(GetTagRequest {
                    name: name.to_string(),
                });
                async move { grpc.get_tag(request).await }
            })
            .await
            .map_err(|e| match e {
                // The same error a local store gives, so callers can tell "absent" apart.
                Error::Remote {
                    code: Code::NotFound,
                    ..
                } => Error::TagNotFound(name.to_string()),
                other => other,
            })?;
        digest_from(&self.url, "GetTag", &response.into_inner().digest)
    }

    async fn set_tag(
        &self,
        name: &str,
        digest: &Digest,
        condition: TagUpdate,
    ) -> Result<Option<Digest>> {
        let retries = self.tag_retries(&condition);
        let response = self
            .call_with_retries("SetTag", retries, |mut grpc| {
                let request = self.request(SetTagRequest {
                    name: name.to_string(),
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    expected: expected_of(&condition),
                });
                async move { grpc.set_tag(request).await }
            })
            .await?;
        let previous = response.into_inner().previous;
        if previous.is_empty() {
            Ok(None)
        } else {
            digest_from(&self.url, "SetTag", &previous).map(Some)
        }
    }

    async fn list_tags(&self, prefix: &str) -> Result<Vec<(String, Digest)>> {
        let response = self
            .call("ListTags", |mut grpc| {
                let request = self.request(ListTagsRequest {
                    prefix: prefix.to_string(),
                });
                async move { grpc.list_tags(request).await }
            })
            .await?;
        response
            .into_inner()
            .tags
            .into_iter()
            .map(|tag| Ok((tag.name, digest_from(&self.url, "ListTags", &tag.digest)?)))
            .collect()
    }
}
