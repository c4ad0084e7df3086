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
            };
            let info: SandboxInfo = api
                .json(api.request(Method::POST, "/v1/sandboxes").json(&request))
                .await?;
            println!("{}", info.sandbox_id);
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
            if tty {
                bail!("terminals (-t) are not built yet; -i sends your stdin to the command");
            }
            let request = ExecRequest {
                argv: command,
                env,
                workdir,
                timeout: timeout.map(|t| t.as_secs_f64()),
                stdin: interactive,
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
                "{:<28} {:<16} {:<8} {:<24} TAGS",
                "ID", "APP", "STATUS", "ENDED BY"
            );
            for sb in list.sandboxes {
                let tags: Vec<String> = sb.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let status = serde_json::to_value(sb.status)?;
                println!(
                    "{:<28} {:<16} {:<8} {:<24} {}",
                    sb.sandbox_id,
                    sb.app,
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

/// Streams a process's output here; with stdin, sends this terminal's stdin to it.
async fn exec(api: &ApiClient, id: &str, request: ExecRequest) -> Result<i32> {
    let with_stdin = request.stdin;
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
                if with_stdin {
                    feeder = Some(tokio::spawn(feed_stdin(
                        api.clone(),
                        format!("/v1/sandboxes/{id}/processes/{process_id}/stdin"),
                    )));
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

/// Sends this terminal's stdin to a process, chunk by chunk, then its end.
async fn feed_stdin(api: ApiClient, path: String) -> Result<()> {
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
    api.send_found(api.request(Method::POST, &format!("{path}?eof=true")))
        .await?;
    Ok(())
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
