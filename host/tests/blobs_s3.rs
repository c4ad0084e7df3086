//! Blobs in S3-compatible storage: a real SeaweedFS started by the test, two stores standing
//! for two hosts, each with its own read-through copy. What one stores the other reads; what
//! is read is verified, so an object changed behind the gateway is reported corrupt and not
//! kept; a store that is down fails by name and works again when it is back.

use lode::store::local::LocalS3;
use lode_registry::{BlobStore, Digest, Error, S3Bucket};

#[test]
fn hosts_share_blobs_through_s3_and_keep_verified_copies() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = LocalS3::start(&dir.path().join("s3")).unwrap();
    let (key, secret) = s3.keys();
    let bucket = S3Bucket::open_with_keys(&s3.url(), key, secret).unwrap();
    bucket.ensure_bucket().unwrap();
    let one = bucket.blobs("blobs", dir.path().join("one")).unwrap();
    let two = bucket.blobs("blobs", dir.path().join("two")).unwrap();

    let bytes = b"a component, say".repeat(1000);
    let digest = one.put(&bytes).unwrap();
    assert_eq!(digest, Digest::of(&bytes));
    assert!(one.local_path(&digest).is_some(), "the writer keeps a copy");
    // The other host has no copy until it reads one.
    assert!(two.local_path(&digest).is_none());
    assert!(two.has(&digest).unwrap());
    assert_eq!(two.size(&digest).unwrap(), bytes.len() as u64);
    assert_eq!(two.get(&digest).unwrap(), bytes);
    let kept = two.local_path(&digest).expect("a copy after the read");
    assert_eq!(std::fs::read(kept).unwrap(), bytes);

    let missing = Digest::of(b"never stored");
    assert!(!two.has(&missing).unwrap());
    assert!(matches!(two.get(&missing), Err(Error::NotFound(_))));

    // Changed behind the gateway: a third host reads it, finds it corrupt, keeps nothing.
    let tampered = one.put(b"the real bytes").unwrap();
    let url = format!("{}/buckets/lode/blobs/{tampered}", s3.filer_url());
    let out = std::process::Command::new("curl")
        .args(["-sf", "-X", "PUT", "--data-binary", "other bytes", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let three = bucket.blobs("blobs", dir.path().join("three")).unwrap();
    match three.get(&tampered) {
        Err(Error::Corrupt { digest, .. }) => assert_eq!(digest, tampered),
        other => panic!("expected corrupt, got {other:?}"),
    }
    assert!(three.local_path(&tampered).is_none());

    // Down: by name; back: works.
    s3.stop_now();
    let err = two.put(b"while down").unwrap_err().to_string();
    assert!(err.contains("object store s3://lode"), "{err}");
    assert_eq!(one.get(&digest).unwrap(), bytes, "a kept copy still reads");
    s3.resume().unwrap();
    let after = two.put(b"after").unwrap();
    assert_eq!(one.get(&after).unwrap(), b"after");
}
