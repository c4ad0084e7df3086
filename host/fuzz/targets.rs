//! What each fuzz target feeds its input to, shared by the cargo-fuzz targets (`./lode.sh
//! fuzz`, on nightly) and the stable replay in `host/tests/fuzz_replay.rs`. Each parser takes
//! outside input; none may panic, and the OCI layer must never write outside its directory.

/// A target: what it does with one input.
pub type Target = fn(&[u8]);

/// Every target by name, for the replay.
pub const TARGETS: [(&str, Target); 6] = [
    ("index", index),
    ("manifest", manifest),
    ("image_spec", image_spec),
    ("oci_layer", oci_layer),
    ("agent_message", agent_message),
    ("call_payload", call_payload),
];

/// An image index, as the registry takes it from a `PutIndex`: parsed, then walked.
pub fn index(data: &[u8]) {
    if let Ok(index) = lode_fs::Index::parse(bytes::Bytes::copy_from_slice(data)) {
        for entry in index.entries() {
            let _ = (entry.name(), entry.kind(), entry.content());
        }
        let _ = index.resolve("etc/passwd");
    }
}

/// A deployment manifest, as `PUT /v1/apps/{app}` takes it.
pub fn manifest(data: &[u8]) {
    if let Ok(manifest) = serde_json::from_slice::<lode::proto::manifest::Manifest>(data) {
        let _ = manifest.validate();
    }
}

/// An image spec, as `lode image build` and the SDK send it.
pub fn image_spec(data: &[u8]) {
    if let Ok(spec) = lode_native_runner::image_spec::ImageSpec::parse(data) {
        let _ = spec.validate();
    }
}

/// One OCI layer tar, applied onto an empty directory: nothing may land beside it.
pub fn oci_layer(data: &[u8]) {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let dest = scratch.path().join("dest");
    std::fs::create_dir(&dest).expect("the layer's directory");
    let _ = lode_native_runner::oci::unpack_layer(data, &dest);
    let beside: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("the scratch directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside, ["dest"], "a layer wrote outside its directory");
}

/// A message from a container's agent, as the host reads it off the socket.
pub fn agent_message(data: &[u8]) {
    let _ = serde_json::from_slice::<lode_native_runner::agent::FromAgent>(data);
}

/// A call body, as the API and containers send it, for JSON and pickle functions and
/// for classes.
pub fn call_payload(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) {
        let methods = ["predict".to_string(), "fit".to_string()];
        let _ = lode::function::check_payload(&body, false, None);
        let _ = lode::function::check_payload(&body, true, None);
        let _ = lode::function::check_payload(&body, false, Some(&methods));
    }
}
