//! The shared model-list fetch that fills the `/v1/models` cache.

use std::sync::Arc;

use warp::http::{HeaderMap, HeaderValue, Method, header};

use super::Upstream;
use super::headers::response_headers;
use std::collections::BTreeMap;

use super::models_cache::{CacheStatus, CachedResponse, FetchResult};
use super::request::RequestBody;
use super::response::mask_every;
use super::router::Table;
use crate::auth::redact::error_chain;
use crate::error::ProxyError;
use crate::vocab::{Shape, classify};

impl Upstream {
    /// One upstream fetch shared by every waiting caller, so it carries no caller's headers: only
    /// the upstream key. In particular no `Accept-Encoding`, or one caller's gzip would be served
    /// to all.
    /// It goes through the key pool like any request.
    pub async fn fetch_models(self) -> FetchResult {
        self.0.metrics.cache_fetch();
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        const MODELS: &str = "/v1/models";
        let url = self.url(
            &classify(&Method::GET, MODELS, Shape::default()),
            MODELS,
            None,
        )?;
        let mut response = self
            .send_alone(self.client(), &Method::GET, url, headers, RequestBody::None)
            .await?;
        let status = response.status();
        let mut headers =
            response_headers(std::mem::take(response.headers_mut()), self.keys_to_mask());
        // Cookies are per caller; a shared answer must not hand one out to everybody.
        headers.remove(header::SET_COOKIE);
        let mut body = response.bytes().await.map_err(|err| {
            log::error!(
                "reading the upstream model list failed: {}",
                error_chain(&err)
            );
            ProxyError::BadGateway
        })?;
        if !status.is_success()
            && let Some(masked) = mask_every(&body, self.keys_to_mask())
        {
            headers.remove(header::CONTENT_LENGTH);
            body = masked;
        }
        Ok(Arc::new(CachedResponse {
            status,
            headers,
            body,
        }))
    }
}

/// How long a merged model list waits for an upstream's: one dead or slow upstream must not hold
/// up the answer; it contributes its last good list, else its exact `models` names.
pub const MERGE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Upstream {
    /// This upstream's models under our names, kept to those its `models` patterns match, and
    /// whether they came from the cache.
    async fn model_entries(&self) -> (Vec<serde_json::Value>, CacheStatus) {
        let upstream = self.clone();
        let fetched = tokio::time::timeout(
            MERGE_WAIT,
            self.models_cache()
                .get_or_fetch(move || upstream.fetch_models()),
        )
        .await;
        let (listed, status) = match fetched {
            Ok((Ok(cached), status)) if cached.status.is_success() => {
                match listed_models(&cached.body) {
                    Some(listed) => {
                        let listed = Arc::new(listed);
                        *self.0.last_models.lock() = Some(listed.clone());
                        (Some(listed), status)
                    }
                    None => (None, status),
                }
            }
            Ok((_, status)) => (None, status),
            Err(_) => {
                log::error!(
                    "upstream {} did not list its models within {}s: its last list is used",
                    self.name(),
                    MERGE_WAIT.as_secs()
                );
                (None, CacheStatus::Miss)
            }
        };
        let listed = listed.or_else(|| self.0.last_models.lock().clone());
        let entries = match listed {
            Some(listed) => listed
                .iter()
                .filter_map(|entry| {
                    let theirs = entry.get("id")?.as_str()?;
                    let ours = self.our_name(theirs);
                    if !self.models().matches(ours) {
                        return None;
                    }
                    let mut entry = entry.clone();
                    entry["id"] = ours.into();
                    Some(entry)
                })
                .collect(),
            None => self
                .models()
                .exact_names()
                .map(|name| model_entry(name, self.name()))
                .collect(),
        };
        (entries, status)
    }
}

/// The `data` of a `{"object":"list","data":[...]}` answer.
fn listed_models(body: &[u8]) -> Option<Vec<serde_json::Value>> {
    let mut list: serde_json::Value = serde_json::from_slice(body).ok()?;
    match list.get_mut("data")?.take() {
        serde_json::Value::Array(data) => Some(data),
        _ => None,
    }
}

fn model_entry(id: &str, owner: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

impl Table {
    /// Every upstream's models under our names, with the aliases, sorted, one entry per id;
    /// `Hit` when every list came from the cache.
    pub async fn merged_models(&self) -> (Vec<serde_json::Value>, CacheStatus) {
        let lists = futures::future::join_all(
            self.upstreams()
                .iter()
                .map(|upstream| upstream.model_entries()),
        )
        .await;
        let mut status = CacheStatus::Hit;
        let mut merged: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (entries, fetched) in lists {
            if fetched == CacheStatus::Miss {
                status = CacheStatus::Miss;
            }
            for entry in entries {
                if let Some(id) = entry.get("id").and_then(|id| id.as_str()) {
                    merged.entry(id.to_string()).or_insert(entry);
                }
            }
        }
        for (alias, target) in self.aliases() {
            let owner = merged
                .get(target)
                .and_then(|entry| entry.get("owned_by"))
                .and_then(|owner| owner.as_str())
                .unwrap_or("llm-proxy")
                .to_string();
            merged
                .entry(alias.clone())
                .or_insert_with(|| model_entry(alias, &owner));
        }
        (merged.into_values().collect(), status)
    }
}
