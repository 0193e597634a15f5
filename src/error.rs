//! Every error the proxy itself produces, and the single place that turns them into JSON responses.
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
    /// The upstream could not be reached or broke before sending response headers.
    BadGateway,
    /// The upstream did not answer with headers in time.
    GatewayTimeout,
    /// The request body is larger than `MAX_BODY_BYTES`, declared or as it streamed in.
    PayloadTooLarge,
    /// A path with dot segments or backslashes, which the upstream could resolve outside `/v1`.
    InvalidPath,
}

impl Reject for ProxyError {}

impl ProxyError {
    fn parts(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ProxyError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Invalid or missing authorization token",
            ),
            ProxyError::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "The upstream server could not be reached",
            ),
            ProxyError::GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                "The upstream server did not answer in time",
            ),
            ProxyError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than this proxy accepts",
            ),
            ProxyError::InvalidPath => (
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "The request path contains dot segments or backslashes",
            ),
        }
    }

    pub fn into_response(self) -> warp::reply::Response {
        let (status, code, message) = self.parts();
        let mut response = json_error(status, code, message);
        if self == ProxyError::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
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

/// The proxy's own error shape: `{"error":"<code>","message":"<text>","time":"<RFC 3339>"}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = ErrorBody {
        error: code,
        message,
        time: rfc3339_now(),
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// The one `recover` of the route tree: maps every rejection to a JSON error.
pub async fn handle_rejection(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    if let Some(error) = rejection.find::<ProxyError>() {
        return Ok(error.into_response());
    }
    if rejection.is_not_found() {
        return Ok(json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "No such route",
        ));
    }
    if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        let mut response = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "This route does not accept that HTTP method",
        );
        // The admin route is the only one the proxy answers itself with a method filter.
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(response);
    }
    log::error!("unhandled rejection: {rejection:?}");
    Ok(json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "The proxy failed to handle the request",
    ))
}
