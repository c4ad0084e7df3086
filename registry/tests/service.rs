//! The registry service over real gRPC on loopback.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use lode_registry::proto::put_blob_request::Part;
use lode_registry::proto::registry_client::RegistryClient as RawClient;
use lode_registry::proto::{BlobHeader, PutBlobRequest};
use lode_registry::{
    BlobAccess, ClientOptions, Digest, RegistryClient, RegistryService, RegistryStore,
    ServiceOptions, TagUpdate,
};
use tokio::net::TcpListener;
use tonic::Code;

const TOKEN: &str = "test-token";

struct Running {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn start_on(listener: TcpListener, dir: &Path, options: ServiceOptions) -> Running {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = RegistryStore::open_dir(dir, None).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        RegistryService::new(store, options)
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running {
        url,
        stop: Some(stop),
        task,
    }
}

async fn start(dir: &Path, options: ServiceOptions) -> Running {
    start_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        dir,
        options,
    )
    .await
}

fn guarded() -> ServiceOptions {
    ServiceOptions {
        token: Some(TOKEN.into()),
        ..Default::default()
    }
}

fn client(url: &str, token: Option<&str>) -> RegistryClient {
    let options = ClientOptions {
        retries: 1,
        backoff: Duration::from_millis(10),
        ..Default::default()
    };
    RegistryClient::new(url, token, options).unwrap()
}

fn code(err: &lode_registry::Error) -> Code {
    match err {
        lode_registry::Error::Remote { code, .. } => *code,
        other => panic!("expected a remote error, got {other}"),
    }
}

fn staging_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("blobs/tmp")).unwrap().count() == 0
}

#[tokio::test]
async fn blobs_indexes_and_tags_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), guarded()).await;
    let registry = client(&running.url, Some(TOKEN));
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i >> 3) as u8).collect();
    let blobs = [Bytes::from_static(b"small"), Bytes::from(big), Bytes::new()];
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    assert_eq!(registry.missing(&digests).await.unwrap(), digests);
    for (digest, blob) in digests.iter().zip(&blobs) {
        assert!(!registry.put_blob(digest, blob.clone()).await.unwrap());
    }
    assert!(
        registry
            .put_blob(&digests[0], blobs[0].clone())
            .await
            .unwrap(),
        "second put reports existed"
    );
    let index = Bytes::from_static(b"any index bytes: this registry has no validator");
    let index_digest = Digest::of(&index);
    registry
        .put_index(&index_digest, index.clone())
        .await
        .unwrap();
    registry
        .set_tag("python:3.11", &index_digest, TagUpdate::IfAbsent)
        .await
        .unwrap();
    running.stop().await;

    let running = start(dir.path(), guarded()).await;
    let registry = client(&running.url, Some(TOKEN));
    assert!(registry.missing(&digests).await.unwrap().is_empty());
    for (digest, blob) in digests.iter().zip(&blobs) {
        assert_eq!(&registry.get_blob(digest).await.unwrap(), blob);
    }
    let range = registry
        .get_range(&digests[1], 1_000_000, 16)
        .await
        .unwrap();
    assert_eq!(&range[..], &blobs[1][1_000_000..1_000_016]);
    assert_eq!(registry.get_index(&index_digest).await.unwrap(), index);
    assert_eq!(registry.get_tag("python:3.11").await.unwrap(), index_digest);
    assert_eq!(
        registry.list_tags("py").await.unwrap(),
        vec![("python:3.11".to_string(), index_digest)]
    );
    running.stop().await;
}

#[tokio::test]
async fn the_server_checks_digests_and_reports_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), guarded()).await;
    let registry = client(&running.url, Some(TOKEN));
    let claimed = Digest::of(b"what the client claims");
    let err = registry
        .put_blob(&claimed, Bytes::from_static(b"what it sends"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert_eq!(
        registry
            .missing(std::slice::from_ref(&claimed))
            .await
            .unwrap(),
        vec![claimed.clone()]
    );
    assert!(staging_is_empty(dir.path()));

    let err = registry.get_blob(&claimed).await.unwrap_err();
    assert_eq!(code(&err), Code::NotFound);
    assert!(err.to_string().contains(&claimed.to_string()), "{err}");
    let err = registry.get_index(&claimed).await.unwrap_err();
    assert!(err.to_string().contains(&claimed.to_string()), "{err}");
    let err = registry.get_tag("no-such-tag").await.unwrap_err();
    assert!(err.to_string().contains("no-such-tag"), "{err}");
    running.stop().await;
}

#[tokio::test]
async fn corrupt_blobs_are_reported_never_served_and_repairable() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), guarded()).await;
    let registry = client(&running.url, Some(TOKEN));
    let blob = Bytes::from_static(b"chunk of a shared library");
    let digest = Digest::of(&blob);
    registry.put_blob(&digest, blob.clone()).await.unwrap();
    let hex = digest.hex();
    let on_disk = dir.path().join("blobs/blake3").join(&hex[..2]).join(&hex);
    std::fs::write(&on_disk, b"chunk of a shared librarz").unwrap();

    let err = registry.get_blob(&digest).await.unwrap_err();
    assert_eq!(code(&err), Code::DataLoss, "{err}");
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    // Reported missing from now on, so the next ingest uploads it again.
    assert_eq!(
        registry
            .missing(std::slice::from_ref(&digest))
            .await
            .unwrap(),
        vec![digest.clone()]
    );
    registry.put_blob(&digest, blob.clone()).await.unwrap();
    assert_eq!(registry.get_blob(&digest).await.unwrap(), blob);
    running.stop().await;
}

#[tokio::test]
async fn writes_need_the_token_and_reads_too_unless_public() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), guarded()).await;
    let blob = Bytes::from_static(b"x");
    let digest = Digest::of(&blob);
    for token in [None, Some("wrong")] {
        let anonymous = client(&running.url, token);
        let err = anonymous.put_blob(&digest, blob.clone()).await.unwrap_err();
        assert_eq!(code(&err), Code::Unauthenticated, "{err}");
        let err = anonymous
            .set_tag("t", &digest, TagUpdate::Always)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::Unauthenticated, "{err}");
        let err = anonymous
            .missing(std::slice::from_ref(&digest))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::Unauthenticated, "{err}");
    }
    client(&running.url, Some(TOKEN))
        .put_blob(&digest, blob.clone())
        .await
        .unwrap();
    running.stop().await;

    let public = ServiceOptions {
        public_read: true,
        ..guarded()
    };
    let running = start(dir.path(), public).await;
    let anonymous = client(&running.url, None);
    assert_eq!(anonymous.get_blob(&digest).await.unwrap(), blob);
    let err = anonymous
        .put_blob(&Digest::of(b"y"), Bytes::from_static(b"y"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::Unauthenticated, "{err}");
    running.stop().await;
}

#[tokio::test]
async fn tag_updates_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), guarded()).await;
    let registry = client(&running.url, Some(TOKEN));
    let (v1, v2) = (Digest::of(b"v1"), Digest::of(b"v2"));
    assert_eq!(
        registry
            .set_tag("app", &v1, TagUpdate::IfAbsent)
            .await
            .unwrap(),
        None
    );
    let err = registry
        .set_tag("app", &v2, TagUpdate::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition, "{err}");
    let stale = registry
        .set_tag("app", &v2, TagUpdate::IfEquals(v2.clone()))
        .await
        .unwrap_err();
    assert!(stale.to_string().contains(&v1.to_string()), "{stale}");
    assert_eq!(
        registry
            .set_tag("app", &v2, TagUpdate::IfEquals(v1.clone()))
            .await
            .unwrap(),
        Some(v1)
    );
    assert_eq!(registry.get_tag("app").await.unwrap(), v2);
    let err = registry
        .set_tag("../escape", &v2, TagUpdate::Always)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    registry
        .delete_tag("app", TagUpdate::IfEquals(v2))
        .await
        .unwrap();
    // Through the client, a missing tag is the same error a local store gives.
    assert!(matches!(
        registry.get_tag("app").await.unwrap_err(),
        lode_registry::Error::TagNotFound(name) if name == "app"
    ));
    running.stop().await;
}

fn raw_put(digest: &Digest, size: u64, data: &[Bytes]) -> Vec<PutBlobRequest> {
    let mut messages = vec![PutBlobRequest {
        part: Some(Part::Header(BlobHeader {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size,
        })),
    }];
    messages.extend(data.iter().map(|d| PutBlobRequest {
        part: Some(Part::Data(d.clone())),
    }));
    messages
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

#[tokio::test]
async fn truncated_and_oversized_uploads_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServiceOptions {
        max_blob: 1 << 20,
        max_message: 2 << 20,
        ..guarded()
    };
    let running = start(dir.path(), options).await;
    let mut raw = RawClient::connect(running.url.clone()).await.unwrap();
    let whole = Bytes::from(vec![5u8; 1000]);
    let digest = Digest::of(&whole);

    // The stream ends early.
    let messages = raw_put(&digest, 1000, &[whole.slice(..400)]);
    let err = raw
        .put_blob(authorized(futures::stream::iter(messages)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("ended after 400 of 1000 bytes"),
        "{}",
        err.message()
    );

    // The client goes away mid-upload.
    let messages = raw_put(&digest, 1000, &[whole.slice(..400)]);
    let stalled =
        futures::StreamExt::chain(futures::stream::iter(messages), futures::stream::pending());
    let call = raw.put_blob(authorized(stalled));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );

    // A declared size over the limit, and a message over the message limit.
    let messages = raw_put(&digest, 2 << 20, &[]);
    let err = raw
        .put_blob(authorized(futures::stream::iter(messages)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("over the limit of 1048576 bytes"),
        "{}",
        err.message()
    );
    let huge = Bytes::from(vec![1u8; 3 << 20]);
    let registry = client(&running.url, Some(TOKEN));
    let err = registry
        .put_index(&Digest::of(&huge), huge)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");

    let registry = client(&running.url, Some(TOKEN));
    assert_eq!(
        registry
            .missing(std::slice::from_ref(&digest))
            .await
            .unwrap(),
        vec![digest]
    );
    assert!(staging_is_empty(dir.path()));
    running.stop().await;
}

#[tokio::test]
async fn the_client_retries_until_the_registry_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    let patient = RegistryClient::new(
        &url,
        Some(TOKEN),
        ClientOptions {
            retries: 8,
            backoff: Duration::from_millis(25),
            ..Default::default()
        },
    )
    .unwrap();
    let impatient = client(&url, Some(TOKEN));
    let err = impatient.missing(&[Digest::of(b"a")]).await.unwrap_err();
    assert_eq!(code(&err), Code::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&url) && err.to_string().contains("lode serve"),
        "{err}"
    );

    let dir_path = dir.path().to_path_buf();
    let late_start = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        start_on(TcpListener::bind(addr).await.unwrap(), &dir_path, guarded()).await
    });
    let missing = patient.missing(&[Digest::of(b"a")]).await.unwrap();
    assert_eq!(missing.len(), 1);
    late_start.await.unwrap().stop().await;
}
