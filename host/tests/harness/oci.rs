//! OCI images for tests: layouts written by hand, and a real registry (Debian's
//! `docker-registry`) behind token auth, with a token server of the test's own that signs
//! its tokens with a key made for the run.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;

/// A one-layer OCI image layout holding a static busybox, written by hand.
pub fn oci_layout(dir: &Path, extra: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let mut layer = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let new_header = || {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    };
    let mut header = new_header();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    layer.append_data(&mut header, "bin/", &[][..]).unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("apt-get install busybox-static");
    let mut header = new_header();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    layer
        .append_data(&mut header, "bin/busybox", &busybox[..])
        .unwrap();
    for applet in ["sh", "cat", "echo"] {
        let mut header = new_header();
        header.set_mode(0o777);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        layer
            .append_link(&mut header, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    for (path, bytes) in extra {
        let mut header = new_header();
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        // Written raw, so a test can put `..` in a name the tar crate would refuse.
        let name = header.as_gnu_mut().unwrap();
        name.name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        layer.append(&header, *bytes).unwrap();
    }
    let layer = layer.into_inner().unwrap().finish().unwrap();
    let (layer_digest, layer_size) = put_blob(dir, &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_OCI=yes"], "Cmd": ["/bin/sh", "-c", "echo from the image cmd $FROM_OCI"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    finish_layout(
        dir,
        &config,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &layer_digest,
        layer_size as u64,
    );
}

/// Stores `bytes` as a blob of the layout at `dir`; its digest and size.
fn put_blob(dir: &Path, bytes: &[u8]) -> (String, usize) {
    use sha2::Digest as _;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// Writes the config, a one-layer manifest and the index around a layer already in `dir`.
fn finish_layout(
    dir: &Path,
    config: &serde_json::Value,
    media_type: &str,
    digest: &str,
    size: u64,
) {
    let (config_digest, config_size) = put_blob(dir, &serde_json::to_vec(config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": media_type, "digest": digest, "size": size}]
    });
    let (manifest_digest, manifest_size) = put_blob(dir, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size}]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(
        dir.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
}

/// An OCI layout whose one uncompressed layer is the directory `root` (tarred by `tar`, so
/// owners, modes and links are kept), with `env` for its config.
pub fn oci_layout_of_tree(dir: &Path, root: &Path, env: &[&str]) {
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer_path = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(root)
        .arg("-cf")
        .arg(&layer_path)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of {}", root.display());
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(&layer_path).unwrap();
    let layer_size = std::io::copy(&mut file, &mut hasher).unwrap();
    let layer_hex = hex::encode(hasher.finalize());
    std::fs::rename(&layer_path, blobs.join(&layer_hex)).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": env},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]}
    });
    finish_layout(
        dir,
        &config,
        "application/vnd.oci.image.layer.v1.tar",
        &format!("sha256:{layer_hex}"),
        layer_size,
    );
}

/// A registry on loopback that wants a bearer token for everything, as Docker Hub does, and
/// the token server that hands tokens to one user and password.
pub struct TokenRegistry {
    /// `127.0.0.1:PORT`, as image references name it.
    pub address: String,
    /// Tokens handed out so far.
    pub tokens_issued: Arc<AtomicUsize>,
    registry: Child,
    dir: tempfile::TempDir,
}

impl TokenRegistry {
    /// Starts `docker-registry` with token auth, trusting a certificate made now, and a token
    /// server that signs with its key for `user`/`password` (and refuses anyone else).
    pub fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=lode-test-token", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl makes the token key");
        assert!(status.success());
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let token_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let token_port = token_listener.local_addr().unwrap().port();
        let tokens_issued = Arc::new(AtomicUsize::new(0));
        let issued = tokens_issued.clone();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        std::thread::spawn(move || {
            for stream in token_listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = answer_token_request(stream, &expected, &key, &der, &issued);
            }
        });

        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {address}\nauth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n\
                 \x20   service: lode-test-registry\n    issuer: lode-test\n    rootcertbundle: {}\n",
                dir.path().join("data").display(),
                cert.display()
            ),
        )
        .unwrap();
        let registry = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("apt-get install docker-registry");
        let ready = super::wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&address).ok()
        });
        assert!(
            ready.is_some(),
            "docker-registry did not listen on {address}"
        );
        Self {
            address,
            tokens_issued,
            registry,
            dir,
        }
    }

    /// Pushes the layout at `layout` as `name` (`repo:tag`) with skopeo, as `user`.
    pub fn push(&self, layout: &Path, name: &str, user: &str, password: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("{user}:{password}"))
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://{}/{name}", self.address))
            .output()
            .expect("apt-get install skopeo");
        assert!(
            out.status.success(),
            "skopeo push of {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Scratch space that goes with the registry.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.registry.kill();
        let _ = self.registry.wait();
    }
}

/// One token request: `401` unless it carries the expected Basic credentials, else a JWT for
/// the scopes asked for, signed RS256 with the certificate in its `x5c` header.
fn answer_token_request(
    mut stream: std::net::TcpStream,
    expected: &str,
    key: &Path,
    cert_der: &[u8],
    issued: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = value.trim().to_string();
        }
    }
    if authorization != expected {
        return stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .map(percent_decode)
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({
        "alg": "RS256", "typ": "JWT",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)],
    });
    let claims = serde_json::json!({
        "iss": "lode-test", "sub": "test", "aud": "lode-test-registry",
        "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", issued.load(Ordering::Relaxed)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())?;
    let signature = openssl.wait_with_output()?.stdout;
    let token = format!("{signing_input}.{}", b64(&signature));
    issued.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({"token": token}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
