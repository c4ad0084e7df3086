//! `lode secret create|ls|rm`: secrets are sent once and shown by name only.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use reqwest::Method;

use crate::cli::client::ApiClient;
use crate::proto::apps::SecretList;

/// Stores `values` as secret `name`, replacing what it held.
pub(crate) async fn put(
    client: &ApiClient,
    name: &str,
    values: &BTreeMap<String, String>,
) -> Result<()> {
    client
        .send_found(
            client
                .request(Method::PUT, &format!("/v1/secrets/{name}"))
                .json(&serde_json::json!({ "values": values })),
        )
        .await?;
    Ok(())
}

/// `lode secret create NAME KEY=VALUE...`.
pub async fn create(client: &ApiClient, name: &str, pairs: &[String]) -> Result<()> {
    let mut values = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("{pair:?} is not KEY=VALUE");
        };
        values.insert(key.to_string(), value.to_string());
    }
    if values.is_empty() {
        bail!("give at least one KEY=VALUE: lode secret create {name} TOKEN=...");
    }
    put(client, name, &values).await?;
    // Names only: the values stay out of terminals and logs.
    let keys: Vec<_> = values.keys().cloned().collect();
    println!("secret {name} stored ({})", keys.join(", "));
    Ok(())
}

/// `lode secret ls`.
pub async fn list(client: &ApiClient) -> Result<()> {
    let answer: SecretList = client
        .json(client.request(Method::GET, "/v1/secrets"))
        .await?;
    if answer.secrets.is_empty() {
        println!("no secrets; create one with `lode secret create NAME KEY=VALUE`");
    }
    for secret in answer.secrets {
        println!("{:<24} {}", secret.name, secret.keys.join(", "));
    }
    Ok(())
}

/// `lode secret rm NAME`.
pub async fn remove(client: &ApiClient, name: &str) -> Result<()> {
    client
        .send_found(client.request(Method::DELETE, &format!("/v1/secrets/{name}")))
        .await?;
    println!("secret {name} removed");
    Ok(())
}
