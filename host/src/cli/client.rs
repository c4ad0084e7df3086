//! The CLI's API client: the server's address and token, requests, and errors read back.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use std::sync::Arc;

use lode_registry::{ClientOptions, RegistryClient};

use crate::cli::args::{ClientArgs, CopyArgs, RegistryArg};
use crate::proto::client_file::{ClientOverrides, RegistryTarget, Resolved};

/// A client for the Lode API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// Public HTTP base URL, when known.
    pub http_url: Option<String>,
}

impl ApiClient {
    /// A client for the resolved server.
    pub fn new(resolved: Resolved) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            base: resolved.api_url,
            token: resolved.token,
            http,
            http_url: resolved.http_url,
        })
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The API token, when one was found.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A request to `path` (starting with `/`), with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request, turning connection failures and API errors into messages.
    pub async fn send(&self, builder: RequestBuilder) -> Result<Response> {
        let response = builder.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!(
                    "cannot reach the Lode API at {}: is `lode serve` running? ({e})",
                    self.base
                )
            } else {
                anyhow::anyhow!("request to the Lode API at {} failed: {e}", self.base)
            }
        })?;
        if response.status().is_success() || response.status() == StatusCode::NOT_FOUND {
            return Ok(response);
        }
        Err(api_error(response).await)
    }

    /// [`ApiClient::send`] where a 404 (no such app, secret, image...) is an error too.
    pub async fn send_found(&self, builder: RequestBuilder) -> Result<Response> {
        let response = self.send(builder).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(api_error(response).await);
        }
        Ok(response)
    }

    /// Sends and decodes a JSON answer; a 404 is an error here.
    pub async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T> {
        let response = self.send_found(builder).await?;
        response.json().await.context("decoding the API's answer")
    }
}

impl ApiClient {
    /// The registry of the server this client talks to (`GET /v1/info`), with the API's
    /// token: one `lode serve` uses one token for both.
    pub async fn registry(&self) -> Result<crate::proto::client_file::RegistryTarget> {
        #[derive(serde::Deserialize)]
        struct Info {
            registry: String,
        }
        let info: Info = self
            .json(self.request(Method::GET, "/v1/info"))
            .await
            .context("asking the server where its registry is")?;
        Ok(crate::proto::client_file::RegistryTarget {
            url: info.registry,
            token: self.token.clone(),
        })
    }
}

/// Turns an API error answer into its message.
pub async fn api_error(response: Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    let message = match (message.trim().is_empty(), status) {
        (true, StatusCode::UNAUTHORIZED) => {
            "the API token is missing or wrong; use the token from the client.json that \
             `lode serve` wrote (or --token / LODE_TOKEN)"
                .to_string()
        }
        (true, _) => format!("the API answered {status} with no details",),
        (false, _) => message,
    };
    if status == StatusCode::UNAUTHORIZED {
        anyhow::anyhow!("{message}")
    } else {
        anyhow::anyhow!("{message} (HTTP {})", status.as_u16())
    }
}

/// Decodes an NDJSON response body line by line as it arrives.
pub fn ndjson_lines<T: DeserializeOwned + 'static>(
    response: Response,
) -> impl futures::Stream<Item = Result<T>> + Unpin {
    fn parse<T: DeserializeOwned>(line: &[u8]) -> Result<T> {
        serde_json::from_slice(line).with_context(|| {
            format!(
                "unexpected line from the API: {}",
                String::from_utf8_lossy(line)
            )
        })
    }
    let state = (response.bytes_stream().boxed(), Vec::<u8>::new(), false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut bytes, mut buffer, mut ended)| async move {
            loop {
                if let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=pos).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some((parse(&line), (bytes, buffer, ended)));
                }
                if ended {
                    if buffer.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    let line = std::mem::take(&mut buffer);
                    return Some((parse(&line), (bytes, buffer, ended)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        buffer.clear();
                        let err = anyhow::anyhow!("the API stream broke off: {e}");
                        return Some((Err(err), (bytes, buffer, true)));
                    }
                    None => ended = true,
                }
            }
        },
    ))
}

/// Where deploys upload: the server's own registry, unless one is named.
pub(crate) async fn deploy_registry(
    args: &ClientArgs,
    api: &ApiClient,
    flag: &RegistryArg,
) -> Result<Arc<lode_registry::RegistryClient>> {
    match &flag.registry {
        Some(_) => registry(args, &flag.registry),
        None => Ok(Arc::new(connect(&api.registry().await?)?)),
    }
}

fn overrides(args: &ClientArgs, registry: Option<&str>) -> ClientOverrides {
    ClientOverrides {
        api_url: args.api_url.clone(),
        token: args.token.clone(),
        config: args.config.clone(),
        registry: registry.map(str::to_string),
    }
}

/// The API client `args` (then the environment, then client.json) point at.
pub(crate) fn client(args: &ClientArgs) -> Result<ApiClient> {
    ApiClient::new(overrides(args, None).resolve()?)
}

/// The registry `flag` (then the environment, then client.json) points at.
pub(crate) fn registry(args: &ClientArgs, flag: &Option<String>) -> Result<Arc<RegistryClient>> {
    let target = overrides(args, flag.as_deref()).resolve_registry()?;
    Ok(Arc::new(connect(&target)?))
}

/// The local and the other registry of a push or pull.
pub(crate) fn registry_pair(
    args: &ClientArgs,
    copy: &CopyArgs,
) -> Result<(RegistryClient, RegistryClient)> {
    let local = registry(args, &copy.local)?;
    let other = connect(&RegistryTarget {
        url: copy.registry.clone(),
        token: copy.remote_token.clone(),
    })?;
    Ok((Arc::unwrap_or_clone(local), other))
}

/// A client for a resolved registry.
pub fn connect(target: &RegistryTarget) -> Result<RegistryClient> {
    Ok(RegistryClient::new(
        &target.url,
        target.token.as_deref(),
        ClientOptions::default(),
    )?)
}

/// Writes one chunk of a process's output (base64, as the API streams it) to `sink`, at once.
pub fn write_output(sink: &mut impl std::io::Write, data: &str) -> Result<()> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .context("undecodable output from the server")?;
    sink.write_all(&bytes)?;
    sink.flush()?;
    Ok(())
}
