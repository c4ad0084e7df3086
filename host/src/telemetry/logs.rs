//! Guest output and platform events per app, in a bounded in-memory store.
//!
//! Each app keeps its most recent lines (oldest dropped first); followers get new lines through
//! a broadcast channel. A request's stdout and stderr reach it through [`RequestOutput`], which
//! splits writes into lines tagged with the app, request id and time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::proto::log::{LogLine, Stream};

/// Longest line kept; longer output is split.
const MAX_LINE: usize = 16 * 1024;
/// Bytes of log text kept per app, whatever the line count (oldest dropped first).
const MAX_BYTES_PER_APP: usize = 16 * 1024 * 1024;
/// Output one request may log before the rest is dropped with a notice.
const MAX_BYTES_PER_REQUEST: usize = 1024 * 1024;

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

    /// One request's stdout or stderr, cut into lines in this store.
    pub fn request_output(
        self: &Arc<Self>,
        app: Arc<str>,
        request_id: Arc<str>,
        stream: Stream,
    ) -> RequestOutput {
        RequestOutput {
            store: self.clone(),
            app,
            request_id,
            stream,
            partial: Vec::new(),
            written: 0,
        }
    }
}

/// One request's output stream: split into lines of at most [`MAX_LINE`] bytes, and cut
/// with a notice past [`MAX_BYTES_PER_REQUEST`]; a partial last line is kept when dropped.
pub struct RequestOutput {
    store: Arc<LogStore>,
    app: Arc<str>,
    request_id: Arc<str>,
    stream: Stream,
    partial: Vec<u8>,
    written: usize,
}

impl RequestOutput {
    /// Takes what the guest wrote; never blocks.
    pub fn write(&mut self, bytes: &[u8]) {
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

impl Drop for RequestOutput {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.flush_partial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_tags_them() {
        let store = LogStore::new(100);
        store.push("app", None, Stream::System, "deployed".into());
        let mut out = store.request_output("app".into(), "req1".into(), Stream::Stdout);
        out.write(b"one\ntw");
        out.write(b"o\r\nthree");
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
        let mut out = store.request_output("a".into(), "r".into(), Stream::Stdout);
        let chunk = vec![b'x'; 100_000];
        for _ in 0..20 {
            out.write(&chunk);
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
        let mut out = store.request_output("gone".into(), "r".into(), Stream::Stdout);
        store.remove("gone");
        out.write(b"late line\n");
        let (lines, _) = store.snapshot("gone", 10);
        assert!(lines.is_empty(), "{lines:?}");
    }
}
