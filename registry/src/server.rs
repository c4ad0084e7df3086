//! The gRPC registry service over a [`RegistryStore`].

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::access::{BlobAccess, RegistryStore};
use crate::proto::put_blob_request::Part;
use crate::proto::registry_server::{Registry, RegistryServer};
use crate::proto::{
    DeleteTagRequest, DeleteTagResponse, GetBlobRequest, GetBlobResponse, GetIndexRequest,
    GetIndexResponse, GetTagRequest, GetTagResponse, HasBlobsRequest, HasBlobsResponse,
    ListTagsRequest, ListTagsResponse, PutBlobRequest, PutBlobResponse, PutIndexRequest,
    PutIndexResponse, SetTagRequest, SetTagResponse, Tag,
};
use crate::tags::TagUpdate;
use crate::{Digest, Error};

/// Bytes per `GetBlob` response message.
const GET_FRAME: usize = 1 << 20;

/// Limits and access rules for [`RegistryService`].
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Token that writes (and, unless `public_read`, reads) must present as
    /// `authorization: Bearer <token>`. `None` leaves the registry open: tests only.
    pub token: Option<Arc<str>>,
    /// Let anyone read blobs, indexes and tags.
    pub public_read: bool,
    /// Largest blob `PutBlob` accepts.
    pub max_blob: u64,
    /// Largest gRPC message, which bounds indexes and digest batches.
    pub max_message: usize,
    /// Blob bytes held in memory at once across all uploads and downloads; calls wait for
    /// room, so many large transfers at once cannot exhaust memory.
    pub max_in_flight: u64,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            token: None,
            public_read: false,
            max_blob: 256 << 20,
            max_message: 64 << 20,
            max_in_flight: 1 << 30,
        }
    }
}

/// The `lode.registry.v1.Registry` service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    store: RegistryStore,
    options: ServiceOptions,
    /// One permit per MiB of `max_in_flight`.
    memory: Arc<Semaphore>,
}

#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    Write,
}

impl RegistryService {
    /// Serves `store` under `options`.
    pub fn new(store: RegistryStore, options: ServiceOptions) -> Self {
        Self {
            memory: Arc::new(Semaphore::new(budget_permits(&options) as usize)),
            store,
            options,
        }
    }

    /// Waits until `bytes` more fit in the in-flight budget. A blob larger than the whole
    /// budget waits for all of it.
    async fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Status> {
        let total = budget_permits(&self.options);
        let wanted = bytes.div_ceil(1 << 20).clamp(1, total.into());
        self.memory
            .clone()
            .acquire_many_owned(wanted as u32)
            .await
            .map_err(|_| Status::unavailable("the registry is shutting down"))
    }

    /// The tonic server for this service, with message limits applied.
    pub fn into_server(self) -> RegistryServer<Self> {
        let max = self.options.max_message;
        RegistryServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        // The builder's tcp_nodelay applies only to listeners tonic binds itself; without it,
        // small responses wait out delayed ACKs (about 40 ms each).
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
            let stream = stream?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        });
        tonic::transport::Server::builder()
            .initial_stream_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONNECTION_WINDOW)
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }

    fn authorize<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        let Some(token) = &self.options.token else {
            return Ok(());
        };
        if access == Access::Read && self.options.public_read {
            return Ok(());
        }
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the registry token is wrong; use the token from `lode serve` (client.json) or \
                 the registry's data dir",
            )),
            None => Err(Status::unauthenticated(
                "this registry needs a token: pass --token or set LODE_TOKEN",
            )),
        }
    }
}

/// The in-flight budget in MiB permits.
fn budget_permits(options: &ServiceOptions) -> u32 {
    (options.max_in_flight >> 20).clamp(1, u64::from(u32::MAX)) as u32
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn digest_arg(bytes: &[u8], field: &str) -> Result<Digest, Status> {
    Digest::from_slice(bytes).map_err(|_| {
        Status::invalid_argument(format!(
            "{field} must be a 32-byte blake3 digest, got {} bytes",
            bytes.len()
        ))
    })
}

/// Maps a store error to the status a client can act on.
pub(crate) fn status_of(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::NotFound(_) | Error::IndexNotFound(_) | Error::TagNotFound(_) => {
            Status::not_found(message)
        }
        Error::Corrupt { .. } => Status::data_loss(message),
        Error::TagConflict { .. } => Status::failed_precondition(message),
        Error::InvalidDigest(_)
        | Error::DigestMismatch { .. }
        | Error::InvalidTag { .. }
        | Error::InvalidIndex { .. } => Status::invalid_argument(message),
        Error::TooLarge { .. } => Status::out_of_range(message),
        Error::Io { .. } | Error::Remote { .. } => Status::internal(message),
        Error::Unavailable { .. } => Status::unavailable(message),
    }
}

fn condition_of(expected: Option<crate::proto::Expected>) -> Result<TagUpdate, Status> {
    match expected {
        None => Ok(TagUpdate::Always),
        Some(e) if e.digest.is_empty() => Ok(TagUpdate::IfAbsent),
        Some(e) => Ok(TagUpdate::IfEquals(digest_arg(
            &e.digest,
            "expected.digest",
        )?)),
    }
}

type BlobStream = Pin<Box<dyn Stream<Item = Result<GetBlobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn has_blobs(
        &self,
        request: Request<HasBlobsRequest>,
    ) -> Result<Response<HasBlobsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let digests = request
            .into_inner()
            .digests
            .iter()
            .map(|d| digest_arg(d, "digests[]"))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.store.missing(&digests).await.map_err(status_of)?;
        Ok(Response::new(HasBlobsResponse {
            missing: missing
                .iter()
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .collect(),
        }))
    }

    async fn put_blob(
        &self,
        request: Request<Streaming<PutBlobRequest>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(PutBlobRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "PutBlob must start with a header naming the digest and size",
                ));
            }
        };
        let digest = digest_arg(&header.digest, "header.digest")?;
        if header.size > self.options.max_blob {
            let too_large = Error::TooLarge {
                what: "blob",
                size: header.size,
                limit: self.options.max_blob,
            };
            return Err(Status::out_of_range(format!(
                "{too_large} (the registry's --max-blob)"
            )));
        }
        // Buffered in memory and stored only once complete and verified, so an upload that
        // ends early or lies about its digest leaves nothing behind.
        let _room = self.reserve(header.size).await?;
        let mut buffer = BytesMut::with_capacity(header.size.min(8 << 20) as usize);
        while let Some(message) = stream.message().await? {
            let Some(Part::Data(data)) = message.part else {
                return Err(Status::invalid_argument(
                    "PutBlob sent a second header; send one header, then data",
                ));
            };
            if (buffer.len() + data.len()) as u64 > header.size {
                return Err(Status::invalid_argument(format!(
                    "upload of {digest} sent more than the {} bytes its header declared; \
                     nothing was stored",
                    header.size
                )));
            }
            buffer.extend_from_slice(&data);
        }
        if buffer.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "upload of {digest} ended after {} of {} bytes; nothing was stored",
                buffer.len(),
                header.size
            )));
        }
        let existed = self
            .store
            .put_blob(&digest, buffer.freeze())
            .await
            .map_err(status_of)?;
        Ok(Response::new(PutBlobResponse { existed }))
    }

    type GetBlobStream = BlobStream;

    async fn get_blob(
        &self,
        request: Request<GetBlobRequest>,
    ) -> Result<Response<BlobStream>, Status> {
        self.authorize(&request, Access::Read)?;
        let request = request.into_inner();
        let digest = digest_arg(&request.digest, "digest")?;
        // The whole blob is read and verified even for a range, so it counts in full.
        let size = self.store.blob_size(&digest).await.map_err(status_of)?;
        let room = self.reserve(size).await?;
        let blob = self.store.get_blob(&digest).await.map_err(status_of)?;
        let total = blob.len() as u64;
        if request.offset > total {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of blob {digest} ({total} bytes)",
                request.offset
            )));
        }
        let end = match request.length {
            0 => total,
            length => request.offset.saturating_add(length).min(total),
        };
        let range = blob.slice(request.offset as usize..end as usize);
        let frames: Vec<Result<GetBlobResponse, Status>> = if range.is_empty() {
            vec![Ok(GetBlobResponse {
                total_size: total,
                data: Bytes::new(),
            })]
        } else {
            (0..range.len())
                .step_by(GET_FRAME)
                .map(|start| {
                    Ok(GetBlobResponse {
                        total_size: total,
                        data: range.slice(start..(start + GET_FRAME).min(range.len())),
                    })
                })
                .collect()
        };
        // The permit lives as long as the stream that holds the blob's bytes.
        let frames = futures::stream::iter(frames).map(move |frame| {
            let _held = &room;
            frame
        });
        Ok(Response::new(Box::pin(frames)))
    }

    async fn put_index(
        &self,
        request: Request<PutIndexRequest>,
    ) -> Result<Response<PutIndexResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let request = request.into_inner();
        let digest = digest_arg(&request.digest, "digest")?;
        let existed = self
            .store
            .put_index(&digest, request.data)
            .await
            .map_err(status_of)?;
        Ok(Response::new(PutIndexResponse { existed }))
    }

    async fn get_index(
        &self,
        request: Request<GetIndexRequest>,
    ) -> Result<Response<GetIndexResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let digest = digest_arg(&request.get_ref().digest, "digest")?;
        let data = self.store.get_index(&digest).await.map_err(status_of)?;
        Ok(Response::new(GetIndexResponse { data }))
    }

    async fn get_tag(
        &self,
        request: Request<GetTagRequest>,
    ) -> Result<Response<GetTagResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let digest = self
            .store
            .get_tag(&request.get_ref().name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(GetTagResponse {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
        }))
    }

    async fn set_tag(
        &self,
        request: Request<SetTagRequest>,
    ) -> Result<Response<SetTagResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let request = request.into_inner();
        let digest = digest_arg(&request.digest, "digest")?;
        let condition = condition_of(request.expected)?;
        let previous = self
            .store
            .set_tag(&request.name, &digest, condition)
            .await
            .map_err(status_of)?;
        Ok(Response::new(SetTagResponse {
            previous: previous.map_or_else(Bytes::new, |d| Bytes::copy_from_slice(d.as_bytes())),
        }))
    }

    async fn delete_tag(
        &self,
        request: Request<DeleteTagRequest>,
    ) -> Result<Response<DeleteTagResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let request = request.into_inner();
        let condition = condition_of(request.expected)?;
        let tags = self.store.tags.clone();
        tokio::task::spawn_blocking(move || tags.delete(&request.name, &condition))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status_of)?;
        Ok(Response::new(DeleteTagResponse {}))
    }

    async fn list_tags(
        &self,
        request: Request<ListTagsRequest>,
    ) -> Result<Response<ListTagsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let tags = self
            .store
            .list_tags(&request.get_ref().prefix)
            .await
            .map_err(status_of)?;
        Ok(Response::new(ListTagsResponse {
            tags: tags
                .into_iter()
                .map(|(name, digest)| Tag {
                    name,
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                })
                .collect(),
        }))
    }
}
