//! App commands: `lode ls`, `lode rm`, `lode logs`, and `lode hosts`.

use std::time::Duration;

use anyhow::{Result, bail};
use futures::StreamExt;
use reqwest::Method;

use crate::cli::client::{ApiClient, ndjson_lines};
use crate::proto::apps::AppList;
use crate::proto::log::{LogLine, Stream};

/// `lode ls`.
pub async fn list(client: &ApiClient) -> Result<()> {
    let answer: AppList = client.json(client.request(Method::GET, "/v1/apps")).await?;
    let apps = answer.apps;
    if apps.is_empty() {
        println!("no apps deployed; deploy one with `lode deploy PATH`");
        return Ok(());
    }
    println!("{:<24} {:>7}  {:<28} URL", "APP", "VERSION", "FUNCTIONS");
    for app in apps {
        let functions: Vec<&str> = app.functions.iter().map(|f| f.name.as_str()).collect();
        let url = app.urls.first().map_or("-", String::as_str);
        println!(
            "{:<24} {:>7}  {:<28} {url}",
            app.app,
            app.version,
            functions.join(",")
        );
    }
    Ok(())
}

/// `lode hosts`.
pub async fn hosts(client: &ApiClient) -> Result<()> {
    let answer: crate::proto::hosts::HostList = client
        .json(client.request(Method::GET, "/v1/hosts"))
        .await?;
    let now = crate::util::now_ms();
    println!(
        "{:<20} {:<28} {:>9} {:>10} {:>5} {:>6} {:>5}  STATE",
        "HOST", "API", "HEARTBEAT", "CONTAINERS", "WASM", "GPUS", "LOAD"
    );
    for host in answer.hosts {
        let r = &host.record;
        let age = Duration::from_millis(now.saturating_sub(r.heartbeat_ms));
        let state = match (host.alive, host.this_host) {
            (_, true) => "alive (this host)",
            (true, false) => "alive",
            (false, false) => "silent",
        };
        println!(
            "{:<20} {:<28} {:>8.1}s {:>10} {:>5} {:>6} {:>5.2}  {state}",
            r.id,
            r.api_url,
            age.as_secs_f64(),
            r.containers,
            r.wasm_instances,
            format!("{}/{}", r.gpus_in_use, r.gpus),
            r.load
        );
    }
    Ok(())
}

fn check_app(app: &str) -> Result<()> {
    if crate::proto::manifest::is_dns_label(app) {
        Ok(())
    } else {
        bail!("{}", crate::proto::manifest::dns_label_rule("app", app))
    }
}

/// `lode rm APP`.
pub async fn remove(client: &ApiClient, app: &str) -> Result<()> {
    check_app(app)?;
    client
        .send_found(client.request(Method::DELETE, &format!("/v1/apps/{app}")))
        .await?;
    println!("removed {app}");
    Ok(())
}

/// `lode logs APP [--follow] [--tail N]`.
pub async fn logs(client: &ApiClient, app: &str, follow: bool, tail: usize) -> Result<()> {
    check_app(app)?;
    let path = format!("/v1/apps/{app}/logs?follow={follow}&tail={tail}");
    let response = client
        .send_found(client.request(Method::GET, &path))
        .await?;
    let mut lines = ndjson_lines::<LogLine>(response);
    while let Some(line) = lines.next().await {
        use std::io::Write as _;
        let printed = writeln!(std::io::stdout(), "{}", format_log_line(&line?));
        match printed {
            // `lode logs APP | head` closes the pipe early: that is a normal end.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    if follow {
        bail!("the server closed the log stream (was the app removed or the server stopped?)");
    }
    Ok(())
}

/// One log line as the CLI prints it.
pub fn format_log_line(line: &LogLine) -> String {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(line.time_ms),
    );
    let stream = match line.stream {
        Stream::Stdout => "out",
        Stream::Stderr => "err",
        Stream::System => "lode",
    };
    let request = line.request_id.as_deref().unwrap_or("-");
    format!("{time} {request} {stream:<4} {}", line.line)
}
