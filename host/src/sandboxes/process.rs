//! Processes in a sandbox: started with the sandbox's environment, their output streamed
//! back as it comes, their stdin written by later calls, and killed at their own timeout,
//! when the caller goes away, or with the sandbox.

use std::io::Write;
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_native_runner::sandbox::ExecSpec;
use tokio::sync::mpsc;

use super::{Entry, Sandboxes};
use crate::native::Refused;
use crate::proto::sandboxes::{ExecLine, ExecRequest};

/// A process's stdin, while it is open.
pub(super) struct Handle {
    stdin: Option<Arc<Mutex<ChildStdin>>>,
}

/// What an exec streams: its lines as they come; dropping it kills the process.
pub struct ProcessStream {
    /// The lines, `Started` first and `Exit` (or `Error`) last.
    pub lines: mpsc::Receiver<ExecLine>,
    /// Set when the receiver goes away: the caller left.
    pub gone: Arc<AtomicBool>,
}

impl Drop for ProcessStream {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}

impl Sandboxes {
    /// Starts `request` in sandbox `id` and streams it. The start waits for the command's
    /// exec, which may fault in pages of a lazily mounted image: the lazy mount is served on
    /// the async threads, so the start runs off them.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        request: ExecRequest,
    ) -> Result<ProcessStream, Refused> {
        let (this, id) = (self.clone(), id.to_string());
        tokio::task::spawn_blocking(move || this.start_process(&id, request))
            .await
            .map_err(Refused::internal)?
    }

    fn start_process(&self, id: &str, request: ExecRequest) -> Result<ProcessStream, Refused> {
        if request.argv.is_empty() {
            return Err(Refused::bad("no command given: exec ID -- CMD..."));
        }
        let max = self.bounds.max_timeout.as_secs_f64();
        if let Some(t) = request.timeout
            && !(t > 0.0 && t <= max)
        {
            return Err(Refused::bad(format!(
                "timeout must be above 0 and at most {max} s (lode serve --max-sandbox-timeout)"
            )));
        }
        for (name, _) in &request.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Refused::bad(format!("{name:?} is not a variable name")));
            }
        }
        let entry = self.running(id)?;
        let mut env = entry.env.clone();
        for (name, value) in &request.env {
            lode_native_runner::image_spec::set_env(&mut env, name, value);
        }
        let exec = ExecSpec {
            argv: request.argv.clone(),
            env,
            cwd: request.workdir.clone().unwrap_or_else(|| entry.cwd.clone()),
        };
        let stdin = if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut process = {
            let live = entry.live.lock().unwrap();
            let Some(live) = live.as_ref() else {
                return Err(super::ended(&entry.info.lock().unwrap()));
            };
            live.exec(&exec, stdin, Stdio::piped(), Stdio::piped())
                .map_err(|e| {
                    let status = match e.kind() {
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => 400,
                        _ => 500,
                    };
                    Refused::new(
                        status,
                        "exec_failed",
                        format!("the process did not start: {e}"),
                    )
                })?
        };
        let process_id = format!("pr-{:016x}", rand::random::<u64>());
        let stdin = process.child.stdin.take().map(|s| Arc::new(Mutex::new(s)));
        entry
            .processes
            .lock()
            .unwrap()
            .insert(process_id.clone(), Handle { stdin });
        let (tx, rx) = mpsc::channel(64);
        let gone = Arc::new(AtomicBool::new(false));
        let _ = tx.try_send(ExecLine::Started {
            process_id: process_id.clone(),
        });
        let out = crate::util::pump_base64(
            process.child.stdout.take(),
            tx.clone(),
            gone.clone(),
            |data| ExecLine::Stdout { data },
        );
        let err = crate::util::pump_base64(
            process.child.stderr.take(),
            tx.clone(),
            gone.clone(),
            |data| ExecLine::Stderr { data },
        );
        let deadline = request
            .timeout
            .map(|t| Instant::now() + Duration::from_secs_f64(t));
        let waiter_gone = gone.clone();
        std::thread::spawn(move || {
            let mut killed_by = None;
            let status = loop {
                let wait = deadline.map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(1), Duration::from_millis(50))
                });
                match process.wait_timeout(wait) {
                    Ok(Some(status)) => break Ok(status),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                if killed_by.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
                    killed_by = Some(format!(
                        "killed: timed out after {}s",
                        request.timeout.unwrap_or_default()
                    ));
                    let _ = process.kill();
                }
                if killed_by.is_none() && waiter_gone.load(Ordering::Relaxed) {
                    killed_by = Some("killed: the caller went away".into());
                    let _ = process.kill();
                }
            };
            let _ = (out.join(), err.join());
            entry.processes.lock().unwrap().remove(&process_id);
            entry.touch();
            if killed_by.is_none() && entry.live.lock().unwrap().is_none() {
                killed_by = Some(format!(
                    "killed: the sandbox ended ({})",
                    entry
                        .info
                        .lock()
                        .unwrap()
                        .ended_by
                        .as_deref()
                        .unwrap_or("ended")
                ));
            }
            let line = match status {
                Ok(status) => ExecLine::Exit {
                    code: lode_native_runner::sandbox::exit_code(status),
                    killed_by,
                },
                Err(e) => ExecLine::Error {
                    message: format!("waiting for the process: {e}"),
                },
            };
            let _ = tx.blocking_send(line);
        });
        Ok(ProcessStream { lines: rx, gone })
    }

    /// Writes `bytes` to a running process's stdin; with `eof`, closes it after.
    pub async fn write_stdin(
        &self,
        id: &str,
        process_id: &str,
        bytes: Vec<u8>,
        eof: bool,
    ) -> Result<(), Refused> {
        let entry = self.running(id)?;
        let stdin = stdin_of(&entry, process_id)?;
        if !bytes.is_empty() {
            let stdin = stdin.clone();
            tokio::task::spawn_blocking(move || stdin.lock().unwrap().write_all(&bytes))
                .await
                .map_err(Refused::internal)?
                .map_err(|e| {
                    Refused::new(
                        409,
                        "stdin_closed",
                        format!("process {process_id} no longer reads its stdin: {e}"),
                    )
                })?;
        }
        if eof && let Some(handle) = entry.processes.lock().unwrap().get_mut(process_id) {
            handle.stdin = None;
        }
        Ok(())
    }
}

fn stdin_of(entry: &Entry, process_id: &str) -> Result<Arc<Mutex<ChildStdin>>, Refused> {
    let processes = entry.processes.lock().unwrap();
    let Some(handle) = processes.get(process_id) else {
        return Err(Refused::new(
            404,
            "not_found",
            format!("no running process {process_id:?} in this sandbox"),
        ));
    };
    handle.stdin.clone().ok_or_else(|| {
        Refused::new(
            409,
            "stdin_closed",
            format!(
                "process {process_id}'s stdin is closed (it was started without stdin, or its \
                 end was sent)"
            ),
        )
    })
}
