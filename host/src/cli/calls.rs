//! Calls by name from the terminal: `lode call`, `lode calls` (the history) and `lode stats`
//! (the pools that serve them).

use anyhow::{Context, Result, bail};
use lode_native_runner::agent::ErrorInfo;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::cli::client::ApiClient;
use crate::proto::calls::{CallAnswer, HistoryPage};
use crate::proto::stats::AppStats;

/// `lode call APP/FN ARG...` (or `APP/Class.method`): each argument is JSON, or else a
/// string. Prints the result as JSON; a remote error is printed with its traceback and exits 1.
pub async fn call(client: &ApiClient, target: &str, args: &[String]) -> Result<i32> {
    let Some((app, function)) = target.split_once('/') else {
        bail!(
            "name the function as APP/FUNCTION (or APP/Class.method), e.g. `lode call demo/square 4`"
        );
    };
    let args: Vec<Value> = args
        .iter()
        .map(|a| serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone())))
        .collect();
    let mut body = serde_json::json!({"args": args, "kwargs": {}});
    // APP/Class.method calls a method of a class's default instance.
    let function = match function.split_once('.') {
        Some((class, method)) => {
            body["method"] = Value::String(method.into());
            class
        }
        None => function,
    };
    let response = client
        .request(
            Method::POST,
            &format!("/v1/apps/{app}/functions/{function}/call"),
        )
        .json(&body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Lode API at {}: {e}", client.base_url()))?;
    let status = response.status();
    let error = match response.json::<CallAnswer>().await {
        Ok(CallAnswer::Value { result }) if status.is_success() => {
            println!("{result}");
            return Ok(0);
        }
        // A Python object only Python can read; the terminal gets no JSON value for it.
        Ok(CallAnswer::Pickled { .. }) if status.is_success() => {
            println!("null");
            return Ok(0);
        }
        Ok(CallAnswer::Failed { error }) => error,
        // A success without a JSON body has no value to show.
        Err(_) if status.is_success() => {
            println!("null");
            return Ok(0);
        }
        _ => ErrorInfo::lode("error", "(no message)"),
    };
    if let Some(traceback) = &error.traceback {
        eprint!("{traceback}");
    }
    eprintln!("{}: {}", error.kind, error.message);
    if status == StatusCode::UNAUTHORIZED {
        return Ok(2);
    }
    Ok(1)
}

/// `lode calls APP`: the app's recent calls, newest first.
pub async fn calls(client: &ApiClient, app: &str, limit: usize, json: bool) -> Result<()> {
    let answer: Value = client
        .json(client.request(
            Method::GET,
            &format!("/v1/apps/{app}/calls?limit={}", limit.clamp(1, 1000)),
        ))
        .await?;
    let page: HistoryPage = serde_json::from_value(answer).context("reading the call records")?;
    let records = page.calls;
    if json {
        for record in &records {
            println!("{}", serde_json::to_string(record)?);
        }
        return Ok(());
    }
    if records.is_empty() {
        println!("no calls of {app} recorded in the last 24 h");
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:<7} {:<9} {:>11}  ERROR",
        "TIME (UTC)", "FUNCTION", "ENGINE", "STATUS", "DURATION"
    );
    for record in records {
        let at = crate::util::format_time_ms(record.created_ms);
        let status = serde_json::to_value(record.status)?;
        let error = record
            .error
            .map(|e| format!("{}: {}", e.kind, e.message.lines().next().unwrap_or("")))
            .unwrap_or_default();
        println!(
            "{at:<24} {:<20} {:<7} {:<9} {:>9.2}ms  {error}",
            record.function,
            record.engine,
            status.as_str().unwrap_or("?"),
            record.duration_ms,
        );
    }
    Ok(())
}

/// `lode stats APP`: each function's containers, queue, cold starts and the GPUs it holds.
pub async fn stats(client: &ApiClient, app: &str) -> Result<()> {
    let answer: AppStats = client
        .json(client.request(Method::GET, &format!("/v1/apps/{app}/stats")))
        .await?;
    println!(
        "{:<20} {:>10} {:>8} {:>7} {:>6} {:>11} {:>7} {:>8} {:>7} {:>4}",
        "FUNCTION",
        "CONTAINERS",
        "STARTING",
        "RUNNING",
        "QUEUED",
        "COLD_STARTS",
        "INPUTS",
        "FAILURES",
        "MIN/MAX",
        "GPUS"
    );
    for f in answer.functions {
        println!(
            "{:<20} {:>10} {:>8} {:>7} {:>6} {:>11} {:>7} {:>8} {:>7} {:>4}",
            f.function,
            f.containers,
            f.starting,
            f.running,
            f.queued,
            f.cold_starts,
            f.inputs,
            f.failures,
            format!("{}/{}", f.min_containers, f.max_containers),
            f.gpus,
        );
    }
    Ok(())
}
