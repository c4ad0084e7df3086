//! Guest output and platform events per app, in a bounded in-memory store.
//!
//! Each app keeps its most recent lines (oldest dropped first); followers get new lines through
//! a broadcast channel. Guest stdout and stderr reach it through [`GuestOutput`], which splits
//! writes into lines tagged with the app, request id and time.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Longest line kept; longer output is split.
const MAX_LINE: usize = 16 * 1024;
/// Bytes of log text kept per app, whatever the line count (oldest dropped first).
const MAX_BYTES_PER_APP: usize = 16 * 1024 * 1024;
/// Output one request may log before the rest is dropped with a notice.
const MAX_BYTES_PER_REQUEST: usize = 1024 * 1024;

/// Where a line came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Guest standard output.
    Stdout,
    /// Guest standard error.
    Stderr,
    /// Lode itself: deploys, traps, timeouts.
    System,
}

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// App name.
    pub app: String,
    /// Request or call id, when the line belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Source stream.
    pub stream: Stream,
    /// The text, without its newline.
    pub line: String,
}

struct AppLog {
    lines: VecDeque<LogLine>,
    /// Total length of the kept lines' text.
    bytes: usize,
    tx: broadcast::Sender<LogLine>,
}

impl AppLog {
    fn new() -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            tx: broadcast::channel(1024).0,
        }
    }
}

/// Bounded per-app log store.
pub struct LogStore {
    capacity: usize,
    apps: Mutex<HashMap<String, AppLog>>,
}

impl LogStore {
    /// A store keeping at most `capacity` lines per app.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            apps: Mutex::new(HashMap::new()),
        })
    }

    fn with_app<R>(&self, app: &str, f: impl FnOnce(&mut AppLog) -> R) -> R {
        let mut apps = self.apps.lock().unwrap();
        f(apps.entry(app.to_string()).or_insert_with(AppLog::new))
    }

    /// Appends a line, creating the app's log if needed.
    pub fn push(&self, app: &str, request_id: Option<&str>, stream: Stream, line: String) {
        self.append(app, request_id, stream, line, true);
    }

    fn append(
        &self,
        app: &str,
        request_id: Option<&str>,
        stream: Stream,
        line: String,
        create: bool,
    ) {
        let mut apps = self.apps.lock().unwrap();
        if !create && !apps.contains_key(app) {
            // The app was removed while this request ran; its output goes nowhere.
            return;
        }
        let log = apps.entry(app.to_string()).or_insert_with(AppLog::new);
        // One line never outweighs the rest of the app's log: what a container sends as a
        // single line is cut like any request's output.
        let mut line = line;
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push_str(" [lode: line cut]");
        }
        let entry = LogLine {
            time_ms: crate::util::now_ms(),
            app: app.to_string(),
            request_id: request_id.map(str::to_string),
            stream,
            line,
        };
        log.bytes += entry.line.len();
        log.lines.push_back(entry.clone());
        while log.lines.len() > self.capacity || log.bytes > MAX_BYTES_PER_APP {
            match log.lines.pop_front() {
                Some(old) => log.bytes -= old.line.len(),
                None => break,
            }
        }
        // No followers is fine.
        let _ = log.tx.send(entry);
    }

    /// The last `tail` lines, and a receiver for lines after them (no gap, no repeat).
    pub fn snapshot(&self, app: &str, tail: usize) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        self.with_app(app, |log| {
            let skip = log.lines.len().saturating_sub(tail);
            let lines = log.lines.iter().skip(skip).cloned().collect();
            (lines, log.tx.subscribe())
        })
    }

    /// Forgets an app's lines (its followers see the channel close).
    pub fn remove(&self, app: &str) {
        self.apps.lock().unwrap().remove(app);
    }

    /// The WASI context every guest call starts from: stdout and stderr into `app`'s log
    /// under `request_id`, and no sockets or name lookups.
    pub fn guest_wasi(
        self: &Arc<Self>,
        app: Arc<str>,
        request_id: Arc<str>,
    ) -> wasmtime_wasi::WasiCtxBuilder {
        let mut builder = wasmtime_wasi::WasiCtxBuilder::new();
        builder
            .stdout(self.guest_output(app.clone(), request_id.clone(), Stream::Stdout))
            .stderr(self.guest_output(app, request_id, Stream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        builder
    }

    /// A stdout or stderr sink for one request.
    pub fn guest_output(
        self: &Arc<Self>,
        app: Arc<str>,
        request_id: Arc<str>,
        stream: Stream,
    ) -> GuestOutput {
        GuestOutput {
            inner: Arc::new(Mutex::new(LineSplitter {
                store: self.clone(),
                app,
                request_id,
                stream,
                partial: Vec::new(),
                written: 0,
            })),
        }
    }
}

struct LineSplitter {
    store: Arc<LogStore>,
    app: Arc<str>,
    request_id: Arc<str>,
    stream: Stream,
    partial: Vec<u8>,
    written: usize,
}

impl LineSplitter {
    fn write(&mut self, bytes: &[u8]) {
        let room = MAX_BYTES_PER_REQUEST.saturating_sub(self.written);
        if room == 0 {
            return;
        }
        let truncated = bytes.len() > room;
        let bytes = &bytes[..bytes.len().min(room)];
        self.written += bytes.len();
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let (mut rest, ends_line) = match piece.strip_suffix(b"\n") {
                Some(line) => (line, true),
                None => (piece, false),
            };
            while !rest.is_empty() {
                let take = (MAX_LINE - self.partial.len()).min(rest.len());
                self.partial.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.partial.len() >= MAX_LINE {
                    self.flush_partial();
                }
            }
            if ends_line {
                if self.partial.last() == Some(&b'\r') {
                    self.partial.pop();
                }
                self.flush_partial();
            }
        }
        if truncated {
            if !self.partial.is_empty() {
                self.flush_partial();
            }
            self.emit(format!(
                "[lode: output of this request passed {MAX_BYTES_PER_REQUEST} bytes; the rest is dropped]"
            ));
        }
    }

    fn flush_partial(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        self.emit(line);
    }

    fn emit(&self, line: String) {
        self.store
            .append(&self.app, Some(&self.request_id), self.stream, line, false);
    }
}

impl Drop for LineSplitter {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.flush_partial();
        }
    }
}

/// A guest's stdout or stderr for one request: always ready, never blocks the guest.
#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Mutex<LineSplitter>>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.inner.lock().unwrap().write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.lock().unwrap().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_tags_them() {
        let store = LogStore::new(100);
        store.push("app", None, Stream::System, "deployed".into());
        let out = store.guest_output("app".into(), "req1".into(), Stream::Stdout);
        {
            let mut splitter = out.inner.lock().unwrap();
            splitter.write(b"one\ntw");
            splitter.write(b"o\r\nthree");
        }
        drop(out);
        let (lines, _) = store.snapshot("app", 10);
        let texts: Vec<_> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["deployed", "one", "two", "three"]);
        assert!(
            lines[1..]
                .iter()
                .all(|l| l.request_id.as_deref() == Some("req1"))
        );
    }

    #[test]
    fn keeps_only_the_newest_lines() {
        let store = LogStore::new(3);
        for i in 0..5 {
            store.push("a", None, Stream::System, format!("line {i}"));
        }
        let (lines, _) = store.snapshot("a", 10);
        let texts: Vec<_> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["line 2", "line 3", "line 4"]);
        let (tail, _) = store.snapshot("a", 1);
        assert_eq!(tail[0].line, "line 4");
    }

    #[test]
    fn keeps_a_byte_budget_per_app() {
        let store = LogStore::new(1_000_000);
        let line = "x".repeat(MAX_LINE);
        for _ in 0..(MAX_BYTES_PER_APP / MAX_LINE + 10) {
            store.push("a", None, Stream::Stdout, line.clone());
        }
        let (lines, _) = store.snapshot("a", usize::MAX);
        let kept: usize = lines.iter().map(|l| l.line.len()).sum();
        assert!(kept <= MAX_BYTES_PER_APP, "{kept}");
        assert_eq!(lines.len(), MAX_BYTES_PER_APP / MAX_LINE);
    }

    #[test]
    fn followers_see_new_lines() {
        let store = LogStore::new(10);
        let (_, mut rx) = store.snapshot("a", 0);
        store.push("a", Some("r"), Stream::Stderr, "boom".into());
        assert_eq!(rx.try_recv().unwrap().line, "boom");
    }

    #[test]
    fn caps_output_per_request() {
        let store = LogStore::new(10_000);
        store.push("a", None, Stream::System, "deployed".into());
        let out = store.guest_output("a".into(), "r".into(), Stream::Stdout);
        let chunk = vec![b'x'; 100_000];
        for _ in 0..20 {
            out.inner.lock().unwrap().write(&chunk);
        }
        drop(out);
        let (lines, _) = store.snapshot("a", 10_000);
        let total: usize = lines.iter().map(|l| l.line.len()).sum();
        assert!(total <= MAX_BYTES_PER_REQUEST + 200, "{total}");
        assert!(
            lines.iter().all(|l| l.line.len() <= MAX_LINE),
            "a line passed MAX_LINE"
        );
        assert!(lines.last().unwrap().line.contains("dropped"));
    }

    #[test]
    fn output_of_a_removed_app_is_dropped() {
        let store = LogStore::new(10);
        store.push("gone", None, Stream::System, "deployed".into());
        let out = store.guest_output("gone".into(), "r".into(), Stream::Stdout);
        store.remove("gone");
        out.inner.lock().unwrap().write(b"late line\n");
        let (lines, _) = store.snapshot("gone", 10);
        assert!(lines.is_empty(), "{lines:?}");
    }
}
