//! File calls on a sandbox: each runs Lode's helper inside it (`LiveSandbox::file_op`), so a
//! path resolves in the sandbox's root with the sandbox's rights, never on the host.

use std::io::{Read, Write};
use std::process::Stdio;

use super::Sandboxes;
use super::wasm::WasmRoom;

/// The longest a file call may take.
const FILE_CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
use crate::native::Refused;
use crate::proto::sandboxes::FileEntry;

/// A path a file call may name: absolute, without `..` or NUL.
fn check_path(path: &str) -> Result<(), Refused> {
    if !path.starts_with('/') {
        return Err(Refused::bad(format!(
            "{path:?} is not an absolute path inside the sandbox"
        )));
    }
    if path.contains('\0') || path.split('/').any(|part| part == "..") {
        return Err(Refused::bad(format!(
            "{path:?} may not hold '..' or NUL: name the path inside the sandbox directly"
        )));
    }
    Ok(())
}

impl Sandboxes {
    /// Runs the helper's `op` on `path` in sandbox `id` with `input` on its stdin, and
    /// returns its stdout, at most `limit` bytes (more is refused, naming the limit).
    fn file_op(
        &self,
        id: &str,
        op: &str,
        path: &str,
        input: Option<Vec<u8>>,
        limit: u64,
    ) -> Result<Vec<u8>, Refused> {
        check_path(path)?;
        let entry = self.running(id)?;
        if let Some(room) = entry.wasm_room() {
            return wasm_file_op(&room, op, path, input, limit);
        }
        let mut process = {
            let live = entry.live.lock().unwrap();
            let Some(super::Live::Container { sandbox: live, .. }) = live.as_ref() else {
                return Err(super::ended(&entry.info.lock().unwrap()));
            };
            live.file_op(op, path, input.as_ref().map(|_| Stdio::piped()))
                .map_err(|e| Refused::internal(format!("starting a file call: {e}")))?
        };
        // A call the sandbox holds up (a huge file, a process holding the helper's pipes) is
        // killed at the deadline rather than holding a thread of the server.
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let waiter = process.child.id();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                cancelled.recv_timeout(FILE_CALL_LIMIT)
            {
                // SAFETY: kill(2) on our own child, still unreaped (its reaper waits for us).
                unsafe { libc::kill(waiter as i32, libc::SIGKILL) };
            }
        });
        if let (Some(bytes), Some(mut stdin)) = (input, process.child.stdin.take()) {
            // A write that fails (the helper stopped: no space, a directory) reports below.
            let _ = stdin.write_all(&bytes);
        }
        let mut output = Vec::new();
        if let Some(stdout) = process.child.stdout.take() {
            let _ = stdout.take(limit + 1).read_to_end(&mut output);
        }
        let mut stderr = Vec::new();
        if let Some(pipe) = process.child.stderr.take() {
            let _ = pipe.take(64 << 10).read_to_end(&mut stderr);
        }
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        if output.len() as u64 > limit {
            let _ = process.kill();
            let _ = process.child.wait();
            return Err(Refused::new(
                413,
                "file_too_large",
                format!(
                    "{path} is larger than this server's limit of {limit} bytes for a file \
                     call (lode serve --sandbox-max-file); read it in a process instead"
                ),
            ));
        }
        let status = process.child.wait().map_err(Refused::internal)?;
        drop(cancel);
        if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL) {
            return Err(Refused::new(
                504,
                "file_call_timeout",
                format!("the file call on {path} took over {FILE_CALL_LIMIT:?}; it was stopped"),
            ));
        }
        let why = stderr.trim().to_string();
        match status.code() {
            Some(0) => Ok(output),
            Some(2) => Err(Refused::new(
                404,
                "not_found",
                format!("no {path} in sandbox {id}"),
            )),
            Some(3) => Err(Refused::new(400, "wrong_kind", why)),
            Some(4) => Err(Refused::new(403, "permission_denied", why)),
            Some(5) => Err(Refused::new(
                507,
                "no_space",
                format!("{why}: the sandbox's writable layer is full"),
            )),
            _ => Err(Refused::new(400, "file_call_failed", why)),
        }
    }

    /// The bytes of the file at `path`.
    pub async fn read_file(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
    ) -> Result<Vec<u8>, Refused> {
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        let limit = self.bounds.max_file_bytes;
        blocking(move || this.file_op(&id, "read", &path, None, limit)).await
    }

    /// Writes `bytes` to the file at `path` (made 0644, or replaced); `append` adds them.
    pub async fn write_file(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
        bytes: Vec<u8>,
        append: bool,
    ) -> Result<(), Refused> {
        if bytes.len() as u64 > self.bounds.max_file_bytes {
            return Err(Refused::new(
                413,
                "file_too_large",
                format!(
                    "{} bytes is over this server's limit of {} for a file call (lode serve \
                     --sandbox-max-file)",
                    bytes.len(),
                    self.bounds.max_file_bytes
                ),
            ));
        }
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        let op = if append { "append" } else { "write" };
        blocking(move || this.file_op(&id, op, &path, Some(bytes), 0).map(drop)).await
    }

    /// The entries of the directory at `path`, by name.
    pub async fn list_files(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
    ) -> Result<Vec<FileEntry>, Refused> {
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        let text = blocking(move || this.file_op(&id, "ls", &path, None, 64 << 20)).await?;
        parse_entries(&text)
    }

    /// What is at `path`.
    pub async fn stat_file(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
    ) -> Result<FileEntry, Refused> {
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        let text = blocking(move || this.file_op(&id, "stat", &path, None, 1 << 20)).await?;
        parse_entries(&text)?
            .pop()
            .ok_or_else(|| Refused::internal("the file helper printed nothing for stat"))
    }

    /// Makes the directory at `path` and its parents.
    pub async fn make_dir(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
    ) -> Result<(), Refused> {
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        blocking(move || this.file_op(&id, "mkdir", &path, None, 0).map(drop)).await
    }

    /// Removes the file at `path`, or the directory and everything in it.
    pub async fn remove_file(
        self: &std::sync::Arc<Self>,
        id: &str,
        path: &str,
    ) -> Result<(), Refused> {
        let (this, id, path) = (self.clone(), id.to_string(), path.to_string());
        blocking(move || this.file_op(&id, "rm", &path, None, 0).map(drop)).await
    }
}

/// A file call in a Wasm-tier sandbox, answered as the container tier's helper answers it
/// (entries as JSON lines).
fn wasm_file_op(
    room: &WasmRoom,
    op: &str,
    path: &str,
    input: Option<Vec<u8>>,
    limit: u64,
) -> Result<Vec<u8>, Refused> {
    let lines = |entries: Vec<FileEntry>| {
        entries
            .iter()
            .map(|e| serde_json::to_string(e).expect("entries serialize") + "\n")
            .collect::<String>()
            .into_bytes()
    };
    match op {
        "read" => room.read(path, limit),
        "write" | "append" => room
            .write(path, &input.unwrap_or_default(), op == "append")
            .map(|()| Vec::new()),
        "ls" => room.list(path).map(lines),
        "stat" => room.stat(path).map(|e| lines(vec![e])),
        "mkdir" => room.make_dir(path).map(|()| Vec::new()),
        "rm" => room.remove(path).map(|()| Vec::new()),
        other => Err(Refused::internal(format!("no file call {other:?}"))),
    }
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(Refused::internal)?
}

fn parse_entries(text: &[u8]) -> Result<Vec<FileEntry>, Refused> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|e| Refused::internal(format!("the file helper's answer: {e}")))
        })
        .collect()
}
