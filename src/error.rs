//! The one error table: every answer the proxy produces itself, with its status, code, message
//! and headers, and the single `recover` that turns rejections into those answers.
//!
//! Upstream errors are not here: they are forwarded untouched. Messages are fixed strings chosen
//! here, never echoes of request data, so no token can leak into an error body.

use std::convert::Infallible;
use std::time::SystemTime;

use serde::Serialize;
use warp::Reply;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reject::{Reject, Rejection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    Unauthorized,
    NotFound,
    /// A route the proxy answers itself was asked with another method; carries the `Allow` value.
    MethodNotAllowed {
        allow: &'static str,
    },
    /// `CONNECT`: this is not a forward proxy, and the connection is closed after the answer.
    ConnectNotSupported,
    /// More than `MAX_CONCURRENT_REQUESTS` in flight.
    Overloaded,
    /// The upstream could not be reached or broke before sending response headers.
    BadGateway,
    /// The upstream did not answer with headers in time.
    GatewayTimeout,
    /// The request body is larger than `MAX_BODY_BYTES`, declared or as it streamed in.
    PayloadTooLarge,
    /// The caller's body, read whole for a key pool's retries, did not arrive within
    /// `UPSTREAM_TIMEOUT_SECS`.
    RequestTimeout,
    /// A path with dot segments or backslashes, which the upstream could resolve outside `/v1`.
    InvalidPath,
    /// A request with a body whose path has no safe canonical form (an encoded `/`, a dot
    /// segment, an invalid escape): the proxy cannot tell which endpoint the upstream would
    /// take it for, so it cannot check or count it.
    UnreadablePath,
    /// Every upstream key rests after a 429 and no request was sent; carries the seconds until the
    /// first is usable again, sent as `Retry-After`.
    KeysResting {
        retry_after: u64,
    },
    /// Every key of `AUTH_BEARER` is disabled (refused with 401, its probe too) until a probe is
    /// accepted: only the operator or the provider can fix that.
    KeysRefused,
    /// The caller's body broke off before its end, while the proxy read it whole (for a possible
    /// retry on another key, or to find its model).
    IncompleteBody,
    /// A client over its requests or tokens per minute, or its concurrency; `retry_after` in
    /// whole seconds, from the limiter's state.
    RateLimited {
        retry_after: u64,
    },
    /// A client over its daily token budget; admitted again at the next UTC midnight.
    QuotaExceeded {
        retry_after: u64,
    },
    /// The request names a model outside the client's `models` list.
    ModelNotAllowed,
    /// The client has a `models` list, and the proxy could not read a model from the body.
    ModelRequired,
    /// A rejection no route accounts for: a bug, logged where it is turned into this.
    Internal,
}

impl Reject for ProxyError {}

/// One row of the table.
struct Answer {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
    headers: &'static [(header::HeaderName, &'static str)],
}

impl ProxyError {
    fn answer(self) -> Answer {
        use ProxyError::*;
        let row = |status, code, message, headers| Answer {
            status,
            code,
            message,
            headers,
        };
        match self {
            Unauthorized => row(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Invalid or missing authorization token",
                &[(header::WWW_AUTHENTICATE, "Bearer")],
            ),
            NotFound => row(StatusCode::NOT_FOUND, "not_found", "No such route", &[]),
            // `Allow` depends on the route and is added in `into_response`.
            MethodNotAllowed { .. } => row(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This route does not accept that HTTP method",
                &[],
            ),
            ConnectNotSupported => row(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "CONNECT is not supported: this is not a forward proxy",
                &[(header::CONNECTION, "close")],
            ),
            Overloaded => row(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Too many requests in flight; retry shortly",
                // Answered at once, without queueing: a client told to retry can go elsewhere.
                &[(header::RETRY_AFTER, "1")],
            ),
            BadGateway => row(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "The upstream server could not be reached",
                &[],
            ),
            GatewayTimeout => row(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                "The upstream server did not answer in time",
                &[],
            ),
            PayloadTooLarge => row(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than this proxy accepts",
                &[],
            ),
            RequestTimeout => row(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "The request body did not arrive in time",
                &[(header::CONNECTION, "close")],
            ),
            InvalidPath => row(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "The request path contains dot segments or backslashes",
                &[],
            ),
            UnreadablePath => row(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "The request path contains an encoded slash, a dot segment or an invalid escape",
                &[],
            ),
            // `Retry-After` depends on the rests and is added in `into_response`.
            KeysResting { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "upstream_keys_rate_limited",
                "Every upstream key is rate-limited; retry after the time in Retry-After",
                &[],
            ),
            KeysRefused => row(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_keys_refused",
                "The upstream refused every key this proxy holds",
                &[],
            ),
            IncompleteBody => row(
                StatusCode::BAD_REQUEST,
                "incomplete_body",
                "The request body ended before it was complete",
                &[],
            ),
            // `Retry-After` is added in `into_response`: it is the limiter's answer.
            RateLimited { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "This client is over its rate limit; retry after the time in Retry-After",
                &[],
            ),
            QuotaExceeded { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                "This client has used its daily token budget; it renews at midnight UTC",
                &[],
            ),
            ModelNotAllowed => row(
                StatusCode::FORBIDDEN,
                "model_not_allowed",
                "This client may not use the requested model",
                &[],
            ),
            ModelRequired => row(
                StatusCode::BAD_REQUEST,
                "model_required",
                "The request body must name a model (a JSON \"model\" field or a model form field)",
                &[],
            ),
            Internal => row(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "The proxy failed to handle the request",
                &[],
            ),
        }
    }

    pub fn status(self) -> StatusCode {
        self.answer().status
    }

    /// The proxy's own error shape: `{"error":"<code>","message":"<text>","time":"<RFC 3339>"}`.
    pub fn into_response(self) -> warp::reply::Response {
        let answer = self.answer();
        let body = ErrorBody {
            error: answer.code,
            message: answer.message,
            time: rfc3339_now(),
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), answer.status).into_response();
        let headers = response.headers_mut();
        for (name, value) in answer.headers {
            headers.insert(name, HeaderValue::from_static(value));
        }
        match self {
            ProxyError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ProxyError::RateLimited { retry_after }
            | ProxyError::QuotaExceeded { retry_after }
            | ProxyError::KeysResting { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    time: String,
}

/// Now, as RFC 3339 in UTC with second precision, e.g. `2024-01-01T12:00:00Z`.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The one `recover` of the route tree. Our own rejections win over warp's: a route that matched
/// its path and refused (a token, a method) explains the refusal better than "no such route".
pub async fn handle_rejection(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let error = if let Some(error) = rejection.find::<ProxyError>() {
        *error
    } else if rejection.is_not_found() {
        ProxyError::NotFound
    } else {
        // Every route the proxy answers itself checks its method with `routes::allow`, which
        // rejects with the route's own `Allow`; anything else reaching here is a routing bug.
        log::error!("unhandled rejection: {rejection:?}");
        ProxyError::Internal
    };
    Ok(error.into_response())
}
