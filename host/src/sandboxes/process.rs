//! Processes in a sandbox: started with the sandbox's environment, their output streamed
//! back as it comes, their stdin written by later calls, and killed at their own timeout,
//! when the caller goes away, or with the sandbox.

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_native_runner::sandbox::ExecSpec;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::output::{ExecOutput, OutputBudget};
use super::wasm::WasmRoom;
use super::{Entry, Sandboxes};
use crate::native::Refused;
use crate::proto::sandboxes::{ExecLine, ExecRequest};
use crate::wasm::command::{CommandEnd, CommandRun};
use crate::wasm::store::{GuestOutput, OutputSink};

/// A process's stdin, while it is open, and its terminal if it has one.
pub(super) struct Handle {
    stdin: Option<Stdin>,
    terminal: Option<Arc<std::fs::File>>,
}

/// Where a process's stdin is written.
#[derive(Clone)]
enum Stdin {
    /// A container process's pipe, or its terminal's master.
    Pipe(Arc<Mutex<Box<dyn Write + Send>>>),
    /// A WASI command's in-memory pipe.
    Command(Arc<tokio::sync::Mutex<tokio::io::DuplexStream>>),
}

/// Bytes a WASI command's stdin holds before a writer waits for it to read.
const COMMAND_STDIN_BUFFER: usize = 256 << 10;

/// What an exec streams: its lines as they come; dropping it kills the process.
pub struct ProcessStream {
    /// The lines, `Started` first and `Exit` (or `Error`) last.
    lines: mpsc::UnboundedReceiver<ExecLine>,
    /// Set when the receiver goes away: the caller left.
    pub gone: Arc<AtomicBool>,
    /// The server's count of output sent and not yet taken, which this stream's lines are in.
    queued: Arc<std::sync::atomic::AtomicU64>,
}

impl ProcessStream {
    /// The next line, once it comes; `None` after the last.
    pub async fn next(&mut self) -> Option<ExecLine> {
        let line = self.lines.recv().await?;
        self.taken(&line);
        Some(line)
    }

    fn taken(&self, line: &ExecLine) {
        if let ExecLine::Stdout { data } | ExecLine::Stderr { data } = line {
            let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
            let bytes = (data.len() / 4 * 3).saturating_sub(padding) as u64;
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Drop for ProcessStream {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
        // What the caller never took is no longer held.
        self.lines.close();
        while let Ok(line) = self.lines.try_recv() {
            self.taken(&line);
        }
    }
}

impl Sandboxes {
    /// Starts `request` in sandbox `id` and streams it. A container's start waits for the
    /// command's exec, which may fault in pages of a lazily mounted image: the lazy mount is
    /// served on the async threads, so the start runs off them.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        request: ExecRequest,
    ) -> Result<ProcessStream, Refused> {
        let called = Instant::now();
        self.check_exec(&request)?;
        let entry = self.running(id)?;
        if let Some(room) = entry.wasm_room() {
            if request.tty {
                return Err(Refused::bad(
                    "a WASI command has no terminal (the Wasm tier); run it without -t, or use a \
                     Linux image for a terminal",
                ));
            }
            if request.workdir.is_some() {
                return Err(Refused::bad(
                    "workdir is not available in the Wasm tier: a WASI command starts in / (its \
                     PWD says the sandbox's working directory); pass paths instead",
                ));
            }
            let running = entry.processes.lock().unwrap().len();
            if running >= MAX_COMMANDS_PER_SANDBOX {
                return Err(Refused::new(
                    429,
                    "too_many_processes",
                    format!(
                        "this sandbox runs {running} commands already, the most a Wasm sandbox \
                         runs at once; wait for one to end"
                    ),
                ));
            }
            return self.start_command(entry, room, request, called).await;
        }
        if request.fuel.is_some() {
            return Err(Refused::bad(
                "fuel bounds WASI commands in the Wasm tier; a container's process is bounded \
                 by its timeout",
            ));
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.start_process(entry, request, called))
            .await
            .map_err(Refused::internal)?
    }

    fn check_exec(&self, request: &ExecRequest) -> Result<(), Refused> {
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
        Ok(())
    }

    fn start_process(
        &self,
        entry: Arc<Entry>,
        request: ExecRequest,
        called: Instant,
    ) -> Result<ProcessStream, Refused> {
        let mut env = entry.env.clone();
        for (name, value) in &request.env {
            lode_native_runner::image_spec::set_env(&mut env, name, value);
        }
        if request.tty && !env.iter().any(|(name, _)| name == "TERM") {
            env.push(("TERM".into(), "xterm".into()));
        }
        let exec = ExecSpec {
            argv: request.argv.clone(),
            env,
            cwd: request.workdir.clone().unwrap_or_else(|| entry.cwd.clone()),
            terminal: request.tty,
        };
        let (mut process, terminal) = {
            let live = entry.live.lock().unwrap();
            let Some(super::Live::Container { sandbox: live, .. }) = live.as_ref() else {
                return Err(super::ended(&entry.info.lock().unwrap()));
            };
            let terminal = if request.tty {
                let (rows, cols) = (request.rows.unwrap_or(24), request.cols.unwrap_or(80));
                Some(live.open_terminal(rows, cols).map_err(|e| {
                    Refused::internal(format!("opening a terminal in the sandbox: {e}"))
                })?)
            } else {
                None
            };
            let stdio = |piped: fn() -> Stdio| -> Result<Stdio, Refused> {
                match &terminal {
                    Some(t) => Ok(Stdio::from(t.slave.try_clone().map_err(Refused::internal)?)),
                    None => Ok(piped()),
                }
            };
            let stdin = stdio(if request.stdin {
                Stdio::piped
            } else {
                Stdio::null
            })?;
            let spawned = live.exec(&exec, stdin, stdio(Stdio::piped)?, stdio(Stdio::piped)?);
            // The command holds the terminal's slave now; the server keeps only the master,
            // so reading it ends when the command does.
            let terminal = terminal.map(|t| std::fs::File::from(t.master));
            let process = spawned.map_err(|e| {
                let status = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => 400,
                    _ => 500,
                };
                Refused::new(
                    status,
                    "exec_failed",
                    format!("the process did not start: {e}"),
                )
            })?;
            (process, terminal)
        };
        let (stdin, output, terminal) = match terminal {
            Some(master) => {
                let writer = master.try_clone().map_err(Refused::internal)?;
                let reader = master.try_clone().map_err(Refused::internal)?;
                (
                    Some(Stdin::Pipe(Arc::new(Mutex::new(
                        Box::new(writer) as Box<dyn Write + Send>
                    )))),
                    Some(Box::new(reader) as Box<dyn Read + Send>),
                    Some(Arc::new(master)),
                )
            }
            None => (
                process.child.stdin.take().map(|s| {
                    Stdin::Pipe(Arc::new(Mutex::new(Box::new(s) as Box<dyn Write + Send>)))
                }),
                process
                    .child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                None,
            ),
        };
        let is_terminal = terminal.is_some();
        let (process_id, tx, stream) = started(&entry, stdin, terminal, &self.queued);
        let gone = stream.gone.clone();
        let budget = OutputBudget::new(self.bounds.max_output_bytes, self.queued.clone());
        let out = pump(output, ExecOutput::new(tx.clone(), false, budget.clone()));
        let err = pump(
            process.child.stderr.take(),
            ExecOutput::new(tx.clone(), true, budget.clone()),
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
            if is_terminal {
                // Its terminal's output ends when every holder of the slave has closed it,
                // which a process it left in the background may never do: what came within
                // a moment of its exit is sent, and the reader goes on alone.
                let grace = Instant::now() + Duration::from_secs(1);
                while !out.is_finished() && Instant::now() < grace {
                    std::thread::sleep(Duration::from_millis(5));
                }
            } else {
                let _ = out.join();
            }
            let _ = err.join();
            entry.processes.lock().unwrap().remove(&process_id);
            entry.touch();
            if killed_by.is_none() && entry.live.lock().unwrap().is_none() {
                killed_by = Some(killed_by_end(&entry));
            }
            let line = match status {
                Ok(status) => ExecLine::Exit {
                    code: lode_native_runner::sandbox::exit_code(status),
                    killed_by,
                    output_dropped: dropped(&budget),
                    elapsed_ms: elapsed_ms(called),
                },
                Err(e) => ExecLine::Error {
                    message: format!("waiting for the process: {e}"),
                },
            };
            let _ = tx.send(line);
        });
        Ok(stream)
    }

    /// Starts `request` as a WASI command in a Wasm-tier sandbox: the program is found on
    /// the sandbox's `PATH` (as NAME or NAME.wasm), prepared once per content, and run as a
    /// fresh instance with the sandbox's files, its memory limit, the fuel asked for and a
    /// deadline.
    async fn start_command(
        self: &Arc<Self>,
        entry: Arc<Entry>,
        room: Arc<WasmRoom>,
        request: ExecRequest,
        called: Instant,
    ) -> Result<ProcessStream, Refused> {
        let engine = self.command_engine()?;
        let mut env = entry.env.clone();
        for (name, value) in &request.env {
            lode_native_runner::image_spec::set_env(&mut env, name, value);
        }
        let (this, found_room, found_env, name) = (
            self.clone(),
            room.clone(),
            env.clone(),
            request.argv[0].clone(),
        );
        let cwd = request.workdir.clone().unwrap_or_else(|| entry.cwd.clone());
        let found_cwd = cwd.clone();
        let (program, digest) = match self.known_command(&room, &env, &cwd, &name) {
            Some(found) => found,
            None => tokio::task::spawn_blocking(move || {
                this.find_command(&found_room, &found_env, &found_cwd, &name)
            })
            .await
            .map_err(Refused::internal)??,
        };
        let mut argv = request.argv.clone();
        argv[0] = program;
        set_default(&mut env, "PWD", &cwd);
        let (stdin, reader) = if request.stdin {
            let (writer, reader) = tokio::io::duplex(COMMAND_STDIN_BUFFER);
            (
                Some(Stdin::Command(Arc::new(tokio::sync::Mutex::new(writer)))),
                Some(reader),
            )
        } else {
            (None, None)
        };
        let (process_id, tx, stream) = started(&entry, stdin, None, &self.queued);
        let budget = OutputBudget::new(self.bounds.max_output_bytes, self.queued.clone());
        let (out, err) = (
            GuestOutput::new(ExecOutput::new(tx.clone(), false, budget.clone())),
            GuestOutput::new(ExecOutput::new(tx.clone(), true, budget.clone())),
        );
        let (gone, ended) = (stream.gone.clone(), room.ended.clone());
        let deadline = request
            .timeout
            .map_or(entry.ends_at, |t| {
                Instant::now() + Duration::from_secs_f64(t)
            })
            .min(entry.ends_at);
        let run = CommandRun {
            argv,
            env,
            preopens: room.preopens(),
            stdio: Box::new(move |wasi| {
                match reader {
                    Some(reader) => wasi.stdin(wasmtime_wasi::cli::AsyncStdinStream::new(reader)),
                    None => wasi.stdin(tokio::io::empty()),
                };
                wasi.stdout(out).stderr(err);
            }),
            memory: entry.memory,
            fuel: request.fuel,
            deadline,
            // The caller leaving or the sandbox ending stops the command at its next tick.
            stop: Box::new(move || gone.load(Ordering::Relaxed) || ended.load(Ordering::Relaxed)),
        };
        let (gone, ended) = (stream.gone.clone(), room.ended.clone());
        let own_deadline = request
            .timeout
            .map(|t| Instant::now() + Duration::from_secs_f64(t));
        let ends_at = entry.ends_at;
        tokio::spawn(async move {
            // A command waiting in a host call (a sleep, a read of stdin) runs no Wasm, so
            // the epoch check cannot stop it: this does, dropping the instance.
            let stop = {
                let (gone, ended) = (gone.clone(), ended.clone());
                async move {
                    while !gone.load(Ordering::Relaxed)
                        && !ended.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(STOP_POLL).await;
                    }
                }
            };
            let end = tokio::select! {
                end = engine.run(&digest, run) => end,
                () = stop => Ok(CommandEnd::Stopped("killed: stopped while it waited".into())),
            };
            entry.processes.lock().unwrap().remove(&process_id);
            entry.touch();
            let line = match end {
                Ok(CommandEnd::Exited(code)) => ExecLine::Exit {
                    code,
                    killed_by: None,
                    output_dropped: dropped(&budget),
                    elapsed_ms: elapsed_ms(called),
                },
                Ok(CommandEnd::Stopped(reason)) => ExecLine::Exit {
                    code: 128 + libc::SIGKILL,
                    killed_by: Some(if ended.load(Ordering::Relaxed) {
                        killed_by_end(&entry)
                    } else if gone.load(Ordering::Relaxed) {
                        "killed: the caller went away".into()
                    } else if own_deadline.is_some_and(|d| Instant::now() >= d) {
                        format!(
                            "killed: timed out after {}s",
                            request.timeout.unwrap_or_default()
                        )
                    } else if Instant::now() >= ends_at {
                        "killed: the sandbox's timeout ended it".into()
                    } else {
                        reason
                    }),
                    output_dropped: dropped(&budget),
                    elapsed_ms: elapsed_ms(called),
                },
                Err(e) => ExecLine::Error {
                    message: format!("the command did not run: {e:#}"),
                },
            };
            let _ = tx.send(line);
        });
        Ok(stream)
    }

    /// Where a lookup of command `name` is remembered: by image, name, `PATH` and working
    /// directory.
    fn command_key(
        room: &WasmRoom,
        env: &[(String, String)],
        cwd: &str,
        name: &str,
    ) -> (String, String) {
        let path = command_path(env);
        (room.digest.clone(), format!("{name}\0{path}\0{cwd}"))
    }

    /// A command found before, in the image alone (so nothing of a sandbox's own can shadow
    /// it), and still prepared on the engine.
    fn known_command(
        &self,
        room: &WasmRoom,
        env: &[(String, String)],
        cwd: &str,
        name: &str,
    ) -> Option<(String, blake3::Hash)> {
        let key = Self::command_key(room, env, cwd, name);
        let (program, digest) = self.command_digests.lock().unwrap().get(&key).cloned()?;
        let engine = self.command_engine().ok()?;
        engine.is_ready(&digest).then_some((program, digest))
    }

    /// The sandbox path and content digest of command `name`, prepared on the engine: a
    /// path as given (relative to `cwd`), a bare name looked up on `PATH` as NAME or
    /// NAME.wasm. A lookup that only met the image's files is remembered; one that met the
    /// sandbox's own reads and hashes the program each time.
    fn find_command(
        &self,
        room: &WasmRoom,
        env: &[(String, String)],
        cwd: &str,
        name: &str,
    ) -> Result<(String, blake3::Hash), Refused> {
        let key = Self::command_key(room, env, cwd, name);
        let candidates: Vec<String> = if name.contains('/') {
            vec![if name.starts_with('/') {
                name.to_string()
            } else {
                format!("{}/{name}", cwd.trim_end_matches('/'))
            }]
        } else {
            command_path(env)
                .split(':')
                .filter(|dir| dir.starts_with('/'))
                .flat_map(|dir| {
                    let dir = dir.trim_end_matches('/');
                    [format!("{dir}/{name}"), format!("{dir}/{name}.wasm")]
                })
                .collect()
        };
        let mut only_image = true;
        let Some(program) = candidates.into_iter().find(|path| {
            only_image &= room.is_image_path(path);
            room.stat(path).is_ok_and(|entry| entry.kind == "file")
        }) else {
            return Err(Refused::new(
                400,
                "exec_failed",
                format!(
                    "no command {name:?} in the sandbox (a WASI program, looked up on its PATH as \
                     {name} or {name}.wasm)"
                ),
            ));
        };
        let engine = self.command_engine()?;
        let bytes = room.read(&program, MAX_COMMAND_BYTES)?;
        let digest = blake3::hash(&bytes);
        engine.prepare(digest, &bytes).map_err(|e| {
            Refused::new(
                400,
                "exec_failed",
                format!("{program} is not a WASI command Lode can run: {e:#}"),
            )
        })?;
        if only_image && key.1.len() <= 4096 {
            self.command_digests
                .lock()
                .unwrap()
                .insert(key, (program.clone(), digest));
        }
        Ok((program, digest))
    }

    /// Tells a running process with a terminal that it is `rows` by `cols` now.
    pub fn resize(&self, id: &str, process_id: &str, rows: u16, cols: u16) -> Result<(), Refused> {
        let entry = self.running(id)?;
        let processes = entry.processes.lock().unwrap();
        let handle = processes.get(process_id).ok_or_else(|| {
            Refused::new(
                404,
                "not_found",
                format!("no running process {process_id:?} in this sandbox"),
            )
        })?;
        let terminal = handle.terminal.as_ref().ok_or_else(|| {
            Refused::bad(format!(
                "process {process_id} has no terminal (start it with tty: true, lode sandbox \
                 exec -t)"
            ))
        })?;
        lode_native_runner::sandbox::Terminal::resize(terminal.as_ref(), rows, cols)
            .map_err(Refused::internal)
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
            let written = match stdin {
                Stdin::Pipe(pipe) => {
                    tokio::task::spawn_blocking(move || pipe.lock().unwrap().write_all(&bytes))
                        .await
                        .map_err(Refused::internal)?
                }
                Stdin::Command(pipe) => pipe.lock().await.write_all(&bytes).await,
            };
            written.map_err(|e| {
                Refused::new(
                    409,
                    "stdin_closed",
                    format!("process {process_id} no longer reads its stdin: {e}"),
                )
            })?;
        }
        let terminal_eof = {
            let mut processes = entry.processes.lock().unwrap();
            match processes.get_mut(process_id) {
                // A terminal has no end of its input; the end-of-file character is as close.
                Some(handle) if eof && handle.terminal.is_some() => handle.stdin.clone(),
                Some(handle) if eof => {
                    handle.stdin = None;
                    None
                }
                _ => None,
            }
        };
        if let Some(Stdin::Pipe(pipe)) = terminal_eof {
            let _ =
                tokio::task::spawn_blocking(move || pipe.lock().unwrap().write_all(&[0x04])).await;
        }
        Ok(())
    }
}

/// How often a WASI command waiting in a host call is checked for its deadline and stop.
const STOP_POLL: Duration = Duration::from_millis(50);

/// WASI commands running at once in one sandbox; each may hold the sandbox's memory.
const MAX_COMMANDS_PER_SANDBOX: usize = 16;

/// Where commands are looked up when the sandbox has no `PATH`.
const DEFAULT_COMMAND_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where commands are looked up: the sandbox's `PATH`, or the default.
fn command_path(env: &[(String, String)]) -> &str {
    env.iter()
        .find(|(n, _)| n == "PATH")
        .map_or(DEFAULT_COMMAND_PATH, |(_, v)| v.as_str())
}

/// The largest WASI program an exec loads.
const MAX_COMMAND_BYTES: u64 = 1 << 30;

/// Registers a process of `entry` and opens its stream with its `Started` line.
fn started(
    entry: &Entry,
    stdin: Option<Stdin>,
    terminal: Option<Arc<std::fs::File>>,
    queued: &Arc<std::sync::atomic::AtomicU64>,
) -> (String, mpsc::UnboundedSender<ExecLine>, ProcessStream) {
    let process_id = format!("pr-{:016x}", rand::random::<u64>());
    entry
        .processes
        .lock()
        .unwrap()
        .insert(process_id.clone(), Handle { stdin, terminal });
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(ExecLine::Started {
        process_id: process_id.clone(),
    });
    let stream = ProcessStream {
        lines: rx,
        gone: Arc::new(AtomicBool::new(false)),
        queued: queued.clone(),
    };
    (process_id, tx, stream)
}

/// Copies a container process's pipe into its stream, within its output budget; the pipe
/// is read to its end whatever is dropped, so the process never blocks on it.
fn pump(
    pipe: Option<impl Read + Send + 'static>,
    output: ExecOutput,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut output = output;
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => OutputSink::write(&mut output, &buffer[..n]),
            }
        }
    })
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn dropped(budget: &OutputBudget) -> Option<u64> {
    Some(budget.dropped.load(Ordering::Relaxed)).filter(|n| *n > 0)
}

fn killed_by_end(entry: &Entry) -> String {
    format!(
        "killed: the sandbox ended ({})",
        entry
            .info
            .lock()
            .unwrap()
            .ended_by
            .as_deref()
            .unwrap_or("ended")
    )
}

/// Sets `name` unless it is set.
fn set_default(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    if !env.iter().any(|(n, _)| n == name) {
        env.push((name.to_string(), value.to_string()));
    }
}

fn stdin_of(entry: &Entry, process_id: &str) -> Result<Stdin, Refused> {
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
