//! The shared model-list fetch that fills the `/v1/models` cache.

use std::sync::Arc;

use warp::http::{HeaderMap, HeaderValue, Method, header};

use super::Upstream;
use super::headers::response_headers;
use super::models_cache::{CachedResponse, FetchResult};
use super::request::RequestBody;
use super::response::mask_every;
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
            .send_with_keys(self.client(), Method::GET, url, headers, RequestBody::None)
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
