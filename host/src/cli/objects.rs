//! `lode dict ...` and `lode queue ...`: look into Dicts and Queues, make and remove them.
//! Keys and values are JSON, as the SDK stores them.

use anyhow::Result;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::args::{DictCommand, QueueCommand};
use crate::cli::client::ApiClient;
use crate::proto::objects::ObjectInfo;

#[derive(Deserialize)]
struct Listed {
    objects: Vec<ObjectInfo>,
}

/// A command-line word as JSON: JSON if it parses, else a string.
fn json_word(word: &str) -> Value {
    serde_json::from_str(word).unwrap_or_else(|_| Value::String(word.to_string()))
}

async fn op(client: &ApiClient, kind: &str, name: &str, request: Value) -> Result<Value> {
    client
        .json(
            client
                .request(Method::POST, &format!("/v1/{kind}s/{name}"))
                .json(&request),
        )
        .await
}

async fn list(client: &ApiClient, kind: &str) -> Result<()> {
    let listed: Listed = client
        .json(client.request(Method::GET, &format!("/v1/{kind}s")))
        .await?;
    println!("{:<32} {:>10}  CREATED", "NAME", "LEN");
    for info in listed.objects {
        println!(
            "{:<32} {:>10}  {}",
            info.name,
            info.len,
            crate::util::format_time_ms(info.created_ms)
        );
    }
    Ok(())
}

async fn create(client: &ApiClient, kind: &str, name: &str) -> Result<()> {
    client
        .send(client.request(Method::PUT, &format!("/v1/{kind}s/{name}")))
        .await?;
    println!("{kind} {name} ready");
    Ok(())
}

async fn remove(client: &ApiClient, kind: &str, name: &str) -> Result<()> {
    client
        .send(client.request(Method::DELETE, &format!("/v1/{kind}s/{name}")))
        .await?;
    println!("{kind} {name} removed");
    Ok(())
}

/// `lode dict ...`; returns the exit code (1 for a key that is not there).
pub async fn dict(client: &ApiClient, command: DictCommand) -> Result<i32> {
    match command {
        DictCommand::Ls => list(client, "dict").await?,
        DictCommand::Create { name } => create(client, "dict", &name).await?,
        DictCommand::Rm { name } => remove(client, "dict", &name).await?,
        DictCommand::Get { name, key } => {
            let answer = op(
                client,
                "dict",
                &name,
                json!({"op": "get", "key": json_word(&key)}),
            )
            .await?;
            if answer["found"] != true {
                eprintln!("dict {name} has no key {key}");
                return Ok(1);
            }
            println!("{}", answer["value_json"].as_str().unwrap_or("null"));
        }
        DictCommand::Put { name, key, value } => {
            let value = json_word(&value).to_string();
            let request = json!({"op": "put", "key": json_word(&key), "value_json": value});
            op(client, "dict", &name, request).await?;
        }
        DictCommand::Items { name, limit } => {
            let answer = op(
                client,
                "dict",
                &name,
                json!({"op": "items", "limit": limit}),
            )
            .await?;
            for item in answer["items"].as_array().into_iter().flatten() {
                println!("{}\t{}", item[0], item[1].as_str().unwrap_or("null"));
            }
        }
        DictCommand::Clear { name } => {
            op(client, "dict", &name, json!({"op": "clear"})).await?;
        }
    }
    Ok(0)
}

/// `lode queue ...`.
pub async fn queue(client: &ApiClient, command: QueueCommand) -> Result<i32> {
    match command {
        QueueCommand::Ls => list(client, "queue").await?,
        QueueCommand::Create { name } => create(client, "queue", &name).await?,
        QueueCommand::Rm { name } => remove(client, "queue", &name).await?,
        QueueCommand::Len { name, partition } => {
            let request =
                json!({"op": "len", "partition": partition, "total": partition.is_none()});
            println!("{}", op(client, "queue", &name, request).await?["len"]);
        }
        QueueCommand::Peek { name, n, partition } => {
            let request = json!({"op": "peek", "n": n, "partition": partition});
            let answer = op(client, "queue", &name, request).await?;
            for value in answer["values_json"].as_array().into_iter().flatten() {
                println!("{}", value.as_str().unwrap_or("null"));
            }
        }
        QueueCommand::Put {
            name,
            values,
            partition,
        } => {
            let values: Vec<String> = values.iter().map(|v| json_word(v).to_string()).collect();
            let request = json!({"op": "put", "values_json": values, "partition": partition});
            op(client, "queue", &name, request).await?;
        }
        QueueCommand::Clear { name, partition } => {
            let request =
                json!({"op": "clear", "partition": partition, "all": partition.is_none()});
            op(client, "queue", &name, request).await?;
        }
    }
    Ok(0)
}
