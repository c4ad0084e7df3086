//! `lode volume create|ls`: named directories functions mount.

use anyhow::Result;
use reqwest::Method;

use crate::cli::client::ApiClient;
use crate::proto::apps::VolumeList;

/// `lode volume create NAME`.
pub async fn create(client: &ApiClient, name: &str) -> Result<()> {
    client
        .send_found(client.request(Method::PUT, &format!("/v1/volumes/{name}")))
        .await?;
    println!("volume {name} ready");
    Ok(())
}

/// `lode volume ls`.
pub async fn list(client: &ApiClient) -> Result<()> {
    let answer: VolumeList = client
        .json(client.request(Method::GET, "/v1/volumes"))
        .await?;
    for name in answer.volumes {
        println!("{name}");
    }
    Ok(())
}
