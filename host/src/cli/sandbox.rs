//! `lode sandbox create|exec|ls|cp|rm`: sandboxes from the terminal.

use std::io::Read;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use reqwest::Method;

use crate::cli::args::SandboxCommand;
use crate::cli::client::{ApiClient, ndjson_lines, write_output};
use crate::proto::sandboxes::{
    ExecLine, ExecRequest, SandboxInfo, SandboxList, SandboxRequest, SnapshotAnswer,
    SnapshotRequest,
};

/// Runs one `lode sandbox` command; returns the exit code (an exec's is its command's).
pub async fn run(api: &ApiClient, command: SandboxCommand) -> Result<i32> {
    match command {
        SandboxCommand::Create {
            image,
            app,
            cpu,
            memory,
            pids,
            timeout,
            idle_timeout,
            net,
            allow,
            tags,
            env,
            volume,
            lode_volume,
            secret,
            port,
            workdir,
        } => {
            let request = SandboxRequest {
                app,
                image,
                cpu,
                memory,
                pids,
                timeout: timeout.map(|t| t.as_secs_f64()),
                idle_timeout: idle_timeout.map(|t| t.as_secs_f64()),
                network: Some(net),
                allow_net: allow,
                tags: tags.into_iter().collect(),
                env,
                workdir,
                volumes: volume,
                named_volumes: lode_volume,
                secrets: secret,
                ports: port,
            };
            let info: SandboxInfo = api
                .json(api.request(Method::POST, "/v1/sandboxes").json(&request))
                .await?;
            println!("{}", info.sandbox_id);
            for tunnel in &info.tunnels {
                eprintln!(
                    "port {} -> {}:{}",
                    tunnel.port, tunnel.host, tunnel.host_port
                );
            }
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            interactive,
            tty,
            workdir,
            env,
            timeout,
            fuel,
            command,
        } => {
            let mut env = env;
            let size = tty.then(terminal::size).flatten();
            if tty
                && !env.iter().any(|(name, _)| name == "TERM")
                && let Ok(term) = std::env::var("TERM")
            {
                env.push(("TERM".into(), term));
            }
            let request = ExecRequest {
                argv: command,
                env,
                workdir,
                timeout: timeout.map(|t| t.as_secs_f64()),
                // A terminal reads what you type.
                stdin: interactive || tty,
                tty,
                rows: size.map(|s| s.0),
                cols: size.map(|s| s.1),
                fuel,
            };
            exec(api, &id, request).await
        }
        SandboxCommand::Ls { app, tags } => {
            let mut query: Vec<(String, String)> = Vec::new();
            if let Some(app) = app {
                query.push(("app".into(), app));
            }
            for (k, v) in tags {
                query.push(("tag".into(), format!("{k}={v}")));
            }
            let list: SandboxList = api
                .json(api.request(Method::GET, &format!("/v1/sandboxes?{}", encode(&query))))
                .await?;
            if list.sandboxes.is_empty() {
                println!("no sandboxes; start one with `lode sandbox create IMAGE`");
                return Ok(0);
            }
            println!(
                "{:<28} {:<16} {:<10} {:<8} {:<24} TAGS",
                "ID", "APP", "TIER", "STATUS", "ENDED BY"
            );
            for sb in list.sandboxes {
                let tags: Vec<String> = sb.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let status = serde_json::to_value(sb.status)?;
                let tier = serde_json::to_value(sb.tier)?;
                println!(
                    "{:<28} {:<16} {:<10} {:<8} {:<24} {}",
                    sb.sandbox_id,
                    sb.app,
                    tier.as_str().unwrap_or("?"),
                    status.as_str().unwrap_or("?"),
                    sb.ended_by.as_deref().unwrap_or("-"),
                    tags.join(",")
                );
            }
            Ok(0)
        }
        SandboxCommand::Cp { source, dest } => {
            copy(api, &source, &dest).await?;
            Ok(0)
        }
        SandboxCommand::Snapshot { id, tag } => {
            let answer: SnapshotAnswer = api
                .json(
                    api.request(Method::POST, &format!("/v1/sandboxes/{id}/snapshot"))
                        .json(&SnapshotRequest { tag }),
                )
                .await?;
            println!("{}", answer.image);
            Ok(0)
        }
        SandboxCommand::Rm { id } => {
            let info: SandboxInfo = api
                .json(api.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
                .await?;
            println!(
                "{} ended ({})",
                info.sandbox_id,
                info.ended_by.as_deref().unwrap_or("ended")
            );
            Ok(0)
        }
    }
}

/// Streams a process's output here; with stdin, sends this terminal's stdin to it. With a
/// terminal, this one is raw while it runs (when it is a terminal) and its size follows.
async fn exec(api: &ApiClient, id: &str, request: ExecRequest) -> Result<i32> {
    let with_stdin = request.stdin;
    let tty = request.tty;
    let raw = if tty { terminal::Raw::enter() } else { None };
    let response = api
        .send_found(
            api.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&request),
        )
        .await?;
    let mut lines = ndjson_lines::<ExecLine>(response);
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let mut feeder = None;
    while let Some(line) = lines.next().await {
        match line? {
            ExecLine::Started { process_id } => {
                let process = format!("/v1/sandboxes/{id}/processes/{process_id}");
                if with_stdin {
                    feeder = Some(tokio::spawn(feed_stdin(
                        api.clone(),
                        format!("{process}/stdin"),
                        tty,
                    )));
                }
                if tty {
                    tokio::spawn(terminal::follow_size(
                        api.clone(),
                        format!("{process}/resize"),
                    ));
                }
            }
            ExecLine::Stdout { data } => write_output(&mut stdout, &data)?,
            ExecLine::Stderr { data } => write_output(&mut stderr, &data)?,
            ExecLine::Exit {
                code,
                killed_by,
                output_dropped,
                ..
            } => {
                if let Some(feeder) = feeder {
                    feeder.abort();
                }
                drop(raw);
                if let Some(why) = killed_by {
                    eprintln!("lode: {why}");
                }
                if let Some(bytes) = output_dropped {
                    eprintln!(
                        "lode: {bytes} bytes of output were dropped past the server's limit per \
                         process (lode serve --sandbox-max-output)"
                    );
                }
                return Ok(code);
            }
            ExecLine::Error { message } => bail!("{message}"),
        }
    }
    bail!("the server ended the process's stream without an exit status (did `lode serve` stop?)")
}

/// Sends this terminal's stdin to a process, chunk by chunk, then its end: for a process
/// with a terminal, the end-of-file character, as a terminal sends it.
async fn feed_stdin(api: ApiClient, path: String, tty: bool) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buffer[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        api.send_found(api.request(Method::POST, &path).body(chunk))
            .await?;
    }
    if tty {
        api.send_found(api.request(Method::POST, &path).body(vec![0x04]))
            .await?;
    } else {
        api.send_found(api.request(Method::POST, &format!("{path}?eof=true")))
            .await?;
    }
    Ok(())
}

/// This terminal, for `exec -t`.
mod terminal {
    use super::{ApiClient, Method};
    use crate::proto::sandboxes::TerminalSize;

    /// Rows and columns of this terminal, if stdout is one.
    pub fn size() -> Option<(u16, u16)> {
        // SAFETY: an all-zero winsize is valid; TIOCGWINSZ fills it.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ on stdout with a valid winsize pointer.
        let got = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
        (got == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
    }

    /// Stdin in raw mode while held (keys go to the process as typed); put back on drop.
    pub struct Raw(libc::termios);

    impl Raw {
        /// `None` when stdin is not a terminal.
        pub fn enter() -> Option<Self> {
            // SAFETY: an all-zero termios is valid; tcgetattr fills it.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: tcgetattr(3) on stdin with a valid pointer.
            if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
                return None;
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw(3) and tcsetattr(3) on a termios we own, for stdin.
            unsafe {
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw);
            }
            Some(Self(saved))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            // SAFETY: tcsetattr(3) on stdin with the settings saved at entry.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
        }
    }

    /// Sends this terminal's size to the process each time it changes (SIGWINCH).
    pub async fn follow_size(api: ApiClient, path: String) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut changes) = signal(SignalKind::window_change()) else {
            return;
        };
        while changes.recv().await.is_some() {
            if let Some((rows, cols)) = size() {
                let body = TerminalSize { rows, cols };
                let _ = api
                    .send_found(api.request(Method::POST, &path).json(&body))
                    .await;
            }
        }
    }
}

/// `key=value&...`, each part escaped.
fn encode(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The API path of a file in sandbox `id`.
fn files_path(id: &str, path: &str) -> String {
    format!(
        "/v1/sandboxes/{id}/files?{}",
        encode(&[("path".into(), path.into())])
    )
}

/// `ID:/path` names a file in a sandbox; anything else is a local path.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (id.starts_with("sb-") && path.starts_with('/')).then_some((id, path))
}

async fn copy(api: &ApiClient, source: &str, dest: &str) -> Result<()> {
    match (remote(source), remote(dest)) {
        (None, Some((id, path))) => {
            let bytes = std::fs::read(source).with_context(|| format!("reading {source}"))?;
            api.send_found(api.request(Method::PUT, &files_path(id, path)).body(bytes))
                .await?;
            Ok(())
        }
        (Some((id, path)), None) => {
            let response = api
                .send_found(api.request(Method::GET, &files_path(id, path)))
                .await?;
            let bytes = response.bytes().await.context("reading the file's bytes")?;
            std::fs::write(dest, &bytes).with_context(|| format!("writing {dest}"))?;
            Ok(())
        }
        _ => bail!(
            "name one side as SANDBOX_ID:/absolute/path and the other as a local path, e.g. \
             `lode sandbox cp data.csv sb-…:/tmp/data.csv`"
        ),
    }
}
