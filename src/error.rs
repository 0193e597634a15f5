//! The one error table: every answer the proxy produces itself, with its status, code, message
//! and headers, and the single `recover` that turns rejections into those answers. Three shapes,
//! one per kind of answer, each written only here:
//!
//! - [`ProxyError`]: `{"error":"<code>","message":"<text>","time":"<RFC 3339>"}`, or with
//!   `ERROR_FORMAT=openai` OpenAI's `{"error":{"message":...,"type":...,"code":...,"param":null}}`
//!   (see [`ErrorFormat`]), with the headers of its row (`Retry-After`, `x-ratelimit-*`, `Allow`,
//!   ...), the same in both;
//! - [`StreamFailure`]: the last SSE event of a stream the upstream broke off, an `error` object
//!   as OpenAI's streams send it, so SDKs raise; its `type` is `proxy_error`, or `server_error`
//!   with `ERROR_FORMAT=openai`;
//! - [`Readiness`]: `/readyz`, `{"limits":"<mode>","status":"<word>"}`, 503 when not ready, in
//!   either format: it answers probes, which read its status, not SDKs.
//!
//! Upstream errors are not here: they are forwarded untouched. Messages are fixed strings chosen
//! here, never echoes of request data, so no token can leak into an error body.

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use warp::Reply;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reject::{Reject, Rejection};

use crate::vocab::standing::{Standing, TokenLimit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// The variant count, for the test that walks every variant against the README's table.
#[cfg_attr(test, derive(strum::EnumCount))]
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
    /// whole seconds, from the limiter's state, which `standing` tells as `x-ratelimit-*`.
    /// `concurrency` is the client's `max_concurrent_requests` when that is the limit that
    /// refused, told as `x-ratelimit-limit-concurrency` (and none of its places remaining).
    RateLimited {
        retry_after: u64,
        standing: Standing,
        concurrency: Option<u64>,
    },
    /// A client over its daily token budget; admitted again at the next UTC midnight.
    QuotaExceeded {
        retry_after: u64,
        standing: Standing,
    },
    /// A client over its dollar budget (`usd_per_day` or `usd_per_month`): what it spent and
    /// reserved, with this request's reservation, is more than the budget; admitted again when
    /// the UTC day or month ends (`retry_after`, whole seconds).
    BudgetExceeded {
        retry_after: u64,
        standing: Standing,
    },
    /// A client with a dollar budget asked for a model that an upstream the request may go to
    /// has no price for (or an endpoint that generates without naming a model the proxy can
    /// read): it cannot be reserved, so nothing is sent.
    ModelUnpriced,
    /// The request names a model outside the client's `models` list.
    ModelNotAllowed,
    /// The request names a model no upstream of the upstreams file serves (nor an alias of one):
    /// nothing is sent.
    ModelNotFound,
    /// The client has a `models` list, and the proxy could not read a model from the body.
    ModelRequired,
    /// The request's estimate alone is more than one of the client's token limits: it can never
    /// be admitted, so it is not told to wait (no `Retry-After`, no `x-ratelimit-*`: those pace
    /// retries, and no retry of it can succeed).
    RequestExceedsLimit {
        limit: TokenLimit,
    },
    /// A client with token limits sent an output cap that is not a whole number of at least 0:
    /// the request cannot be estimated, so it cannot be charged.
    InvalidOutputCap,
    /// The client has a `models` list, and the endpoint can generate without naming a model
    /// where the proxy can read it, and is not in the client's `endpoints`.
    EndpointNotAllowed,
    /// The request names its model twice where the upstream reads one (a tunnel's `model` query
    /// parameter): the proxy cannot know which one the upstream would take.
    DuplicateModel,
    /// `GET /admin/spend?by=` something other than `client`, `model` or `upstream`.
    InvalidSpendGroup,
    /// A rejection no route accounts for: a bug, logged where it is turned into this.
    Internal,
}

impl Reject for ProxyError {}

pub use crate::config::ErrorFormat;

// OpenAI's error `type`s, one per kind of cause; SDKs pick their exception class from the status,
// and show the type as it is.
const INVALID_REQUEST: &str = "invalid_request_error";
const AUTHENTICATION: &str = "authentication_error";
const PERMISSION: &str = "permission_error";
const RATE_LIMIT: &str = "rate_limit_error";
const SERVER: &str = "server_error";

/// One row of the table.
struct Answer {
    status: StatusCode,
    code: &'static str,
    /// The OpenAI `type` of the code, written with `ERROR_FORMAT=openai`.
    kind: &'static str,
    message: &'static str,
    headers: &'static [(header::HeaderName, &'static str)],
}

impl ProxyError {
    fn answer(self) -> Answer {
        use ProxyError::*;
        let row = |status, code, kind, message, headers| Answer {
            status,
            code,
            kind,
            message,
            headers,
        };
        match self {
            Unauthorized => row(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                AUTHENTICATION,
                "Invalid or missing authorization token",
                &[(header::WWW_AUTHENTICATE, "Bearer")],
            ),
            NotFound => row(
                StatusCode::NOT_FOUND,
                "not_found",
                INVALID_REQUEST,
                "No such route",
                &[],
            ),
            // `Allow` depends on the route and is added in `into_response`.
            MethodNotAllowed { .. } => row(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                INVALID_REQUEST,
                "This route does not accept that HTTP method",
                &[],
            ),
            ConnectNotSupported => row(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                INVALID_REQUEST,
                "CONNECT is not supported: this is not a forward proxy",
                &[(header::CONNECTION, "close")],
            ),
            Overloaded => row(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                SERVER,
                "Too many requests in flight; retry shortly",
                // Answered at once, without queueing: a client told to retry can go elsewhere.
                &[(header::RETRY_AFTER, "1")],
            ),
            BadGateway => row(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                SERVER,
                "The upstream server could not be reached",
                &[],
            ),
            GatewayTimeout => row(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                SERVER,
                "The upstream server did not answer in time",
                &[],
            ),
            PayloadTooLarge => row(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                INVALID_REQUEST,
                "The request body is larger than this proxy accepts",
                &[],
            ),
            RequestTimeout => row(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                INVALID_REQUEST,
                "The request body did not arrive in time",
                &[(header::CONNECTION, "close")],
            ),
            InvalidPath => row(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                INVALID_REQUEST,
                "The request path contains dot segments or backslashes",
                &[],
            ),
            UnreadablePath => row(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                INVALID_REQUEST,
                "The request path contains an encoded slash, a dot segment or an invalid escape",
                &[],
            ),
            // `Retry-After` depends on the rests and is added in `into_response`.
            KeysResting { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "upstream_keys_rate_limited",
                RATE_LIMIT,
                "Every upstream key is rate-limited; retry after the time in Retry-After",
                &[],
            ),
            KeysRefused => row(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_keys_refused",
                SERVER,
                "The upstream refused every key this proxy holds",
                &[],
            ),
            IncompleteBody => row(
                StatusCode::BAD_REQUEST,
                "incomplete_body",
                INVALID_REQUEST,
                "The request body ended before it was complete",
                &[],
            ),
            // `Retry-After` is added in `into_response`: it is the limiter's answer.
            RateLimited { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                RATE_LIMIT,
                "This client is over its rate limit; retry after the time in Retry-After",
                &[],
            ),
            QuotaExceeded { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                RATE_LIMIT,
                "This client has used its daily token budget; it renews at midnight UTC",
                &[],
            ),
            // `Retry-After` is added in `into_response`: the end of the UTC day or month.
            BudgetExceeded { .. } => row(
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exceeded",
                RATE_LIMIT,
                "This client has spent its dollar budget; it renews when the UTC day or month \
                 ends, as Retry-After says",
                &[],
            ),
            ModelUnpriced => row(
                StatusCode::FORBIDDEN,
                "model_unpriced",
                PERMISSION,
                "This client has a dollar budget and the requested model has no price at an \
                 upstream that may serve it",
                &[],
            ),
            ModelNotAllowed => row(
                StatusCode::FORBIDDEN,
                "model_not_allowed",
                PERMISSION,
                "This client may not use the requested model",
                &[],
            ),
            ModelNotFound => row(
                StatusCode::NOT_FOUND,
                "model_not_found",
                INVALID_REQUEST,
                "No upstream serves the requested model",
                &[],
            ),
            ModelRequired => row(
                StatusCode::BAD_REQUEST,
                "model_required",
                INVALID_REQUEST,
                "The request body must name a model (a JSON \"model\" field or a model form field)",
                &[],
            ),
            RequestExceedsLimit { limit } => row(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_exceeds_limit",
                INVALID_REQUEST,
                match limit {
                    TokenLimit::PerMinute => {
                        "The request's token estimate exceeds this client's tokens_per_minute; \
                         lower max_tokens or shorten the prompt"
                    }
                    TokenLimit::PerDay => {
                        "The request's token estimate exceeds this client's tokens_per_day; \
                         lower max_tokens or shorten the prompt"
                    }
                    TokenLimit::UsdPerDay => {
                        "The request's cost reservation exceeds this client's usd_per_day; \
                         lower max_tokens or shorten the prompt"
                    }
                    TokenLimit::UsdPerMonth => {
                        "The request's cost reservation exceeds this client's usd_per_month; \
                         lower max_tokens or shorten the prompt"
                    }
                },
                &[],
            ),
            InvalidOutputCap => row(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                INVALID_REQUEST,
                "max_tokens, max_completion_tokens and max_output_tokens must be whole numbers \
                 of at least 0",
                &[],
            ),
            EndpointNotAllowed => row(
                StatusCode::FORBIDDEN,
                "endpoint_not_allowed",
                PERMISSION,
                "This client may not call this endpoint: it can generate without naming a model \
                 the proxy can check",
                &[],
            ),
            DuplicateModel => row(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                INVALID_REQUEST,
                "The request names its model more than once",
                &[],
            ),
            InvalidSpendGroup => row(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                INVALID_REQUEST,
                "by must be client, model or upstream",
                &[],
            ),
            Internal => row(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                SERVER,
                "The proxy failed to handle the request",
                &[],
            ),
        }
    }

    /// The answer in `format`; status and headers are the same in both.
    pub fn into_response(self, format: ErrorFormat) -> warp::reply::Response {
        let answer = self.answer();
        let body = match format {
            ErrorFormat::Proxy => serde_json::to_vec(&ErrorBody {
                error: answer.code,
                message: answer.message,
                time: rfc3339_now(),
            }),
            ErrorFormat::OpenAi => serde_json::to_vec(&OpenAiErrorBody {
                error: OpenAiError {
                    message: answer.message,
                    r#type: answer.kind,
                    code: answer.code,
                    param: None,
                },
            }),
        };
        // Serialising fixed strings cannot fail.
        let mut response = warp::reply::Response::new(body.unwrap_or_default().into());
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in answer.headers {
            headers.insert(name, HeaderValue::from_static(value));
        }
        match self {
            ProxyError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ProxyError::RateLimited {
                retry_after,
                standing,
                concurrency,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                standing.write_headers(headers);
                if let Some(limit) = concurrency {
                    headers.insert(&LIMIT_CONCURRENCY, HeaderValue::from(limit));
                    headers.insert(&REMAINING_CONCURRENCY, HeaderValue::from(0));
                }
            }
            ProxyError::QuotaExceeded {
                retry_after,
                standing,
            }
            | ProxyError::BudgetExceeded {
                retry_after,
                standing,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                standing.write_headers(headers);
            }
            ProxyError::KeysResting { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
}

// A concurrency refusal's own pair, beside the per-minute trios: no reset, since when a place
// frees cannot be known (`Retry-After: 1` says so).
static LIMIT_CONCURRENCY: header::HeaderName =
    header::HeaderName::from_static("x-ratelimit-limit-concurrency");
static REMAINING_CONCURRENCY: header::HeaderName =
    header::HeaderName::from_static("x-ratelimit-remaining-concurrency");

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    time: String,
}

/// `ERROR_FORMAT=openai`: OpenAI's error object, whose `message` and `code` the SDKs read.
#[derive(Serialize)]
struct OpenAiErrorBody {
    error: OpenAiError,
}

#[derive(Serialize)]
struct OpenAiError {
    message: &'static str,
    r#type: &'static str,
    code: &'static str,
    /// Always null: no proxy error is about one parameter.
    param: Option<&'static str>,
}

/// Why an upstream body ended early; told to an SSE client by one last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailure {
    Stalled,
    Interrupted,
}

impl StreamFailure {
    pub fn code(self) -> &'static str {
        match self {
            StreamFailure::Stalled => "upstream_stream_stalled",
            StreamFailure::Interrupted => "upstream_stream_interrupted",
        }
    }

    fn message(self) -> &'static str {
        match self {
            StreamFailure::Stalled => {
                "The upstream stopped sending data; the response is incomplete"
            }
            StreamFailure::Interrupted => {
                "The upstream connection broke; the response is incomplete"
            }
        }
    }

    /// An OpenAI-style error event, so SDKs reading the stream raise instead of stopping quietly:
    /// they raise on a `data:` whose JSON has an `error`, with its `message` and `code`. No
    /// `event:` line, which SDK versions read differently.
    pub fn sse_event(self, format: ErrorFormat) -> Bytes {
        let mut line = b"data: ".to_vec();
        // Serialising fixed strings into a `Vec` cannot fail.
        let _ = match format {
            ErrorFormat::Proxy => serde_json::to_writer(
                &mut line,
                &StreamErrorEvent {
                    error: StreamErrorObject {
                        code: self.code(),
                        message: self.message(),
                        r#type: "proxy_error",
                    },
                },
            ),
            ErrorFormat::OpenAi => serde_json::to_writer(
                &mut line,
                &OpenAiErrorBody {
                    error: OpenAiError {
                        message: self.message(),
                        r#type: SERVER,
                        code: self.code(),
                        param: None,
                    },
                },
            ),
        };
        line.extend_from_slice(b"\n\n");
        Bytes::from(line)
    }
}

impl fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Error for StreamFailure {}

/// The stream-failure event's JSON, fields in the order the bytes have always had.
#[derive(Serialize)]
struct StreamErrorEvent {
    error: StreamErrorObject,
}

#[derive(Serialize)]
struct StreamErrorObject {
    code: &'static str,
    message: &'static str,
    r#type: &'static str,
}

/// `/readyz`'s answer: 200 while taking traffic, 503 once shutdown has begun or the upstream has
/// refused every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Draining,
    NoUpstreamKey,
    /// Every upstream with a key has its breaker open.
    NoHealthyUpstream,
}

impl Readiness {
    pub fn status(self) -> StatusCode {
        match self {
            Readiness::Ready => StatusCode::OK,
            Readiness::Draining | Readiness::NoUpstreamKey | Readiness::NoHealthyUpstream => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Draining => "draining",
            Readiness::NoUpstreamKey => "no_upstream_key",
            Readiness::NoHealthyUpstream => "no_healthy_upstream",
        }
    }

    /// `{"limits":"<mode>","status":"<word>"}`; `limits` says where the shared state is kept,
    /// and with an upstreams file, `upstreams` each upstream's breaker state.
    pub fn into_response(
        self,
        limits: &str,
        upstreams: Option<std::collections::BTreeMap<String, &'static str>>,
    ) -> warp::reply::Response {
        let body = ReadinessBody {
            limits,
            status: self.word(),
            upstreams,
        };
        warp::reply::with_status(warp::reply::json(&body), self.status()).into_response()
    }
}

#[derive(Serialize)]
struct ReadinessBody<'a> {
    limits: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstreams: Option<std::collections::BTreeMap<String, &'static str>>,
}

/// Now, as RFC 3339 in UTC with second precision, e.g. `2024-01-01T12:00:00Z`.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The one `recover` of the route tree. Our own rejections win over warp's: a route that matched
/// its path and refused (a token, a method) explains the refusal better than "no such route".
pub async fn handle_rejection(
    rejection: Rejection,
    format: ErrorFormat,
) -> Result<warp::reply::Response, Infallible> {
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
    Ok(error.into_response(format))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::vocab::standing::Window;

    /// One example of every variant, each at the place `ordinal` gives it.
    const EXAMPLES: [ProxyError; <ProxyError as strum::EnumCount>::COUNT] = [
        ProxyError::Unauthorized,
        ProxyError::NotFound,
        ProxyError::MethodNotAllowed { allow: "GET" },
        ProxyError::ConnectNotSupported,
        ProxyError::Overloaded,
        ProxyError::BadGateway,
        ProxyError::GatewayTimeout,
        ProxyError::PayloadTooLarge,
        ProxyError::RequestTimeout,
        ProxyError::InvalidPath,
        ProxyError::KeysResting { retry_after: 7 },
        ProxyError::KeysRefused,
        ProxyError::IncompleteBody,
        ProxyError::RateLimited {
            retry_after: 12,
            standing: Standing {
                requests: Some(Window {
                    limit: 5,
                    remaining: 0,
                    reset: Duration::from_millis(59_500),
                }),
                tokens: None,
            },
            concurrency: Some(2),
        },
        ProxyError::QuotaExceeded {
            retry_after: 3600,
            standing: Standing {
                requests: None,
                tokens: Some(Window {
                    limit: 1000,
                    remaining: 400,
                    reset: Duration::from_secs(36),
                }),
            },
        },
        ProxyError::ModelNotAllowed,
        ProxyError::ModelRequired,
        ProxyError::Internal,
        ProxyError::UnreadablePath,
        ProxyError::RequestExceedsLimit {
            limit: TokenLimit::PerMinute,
        },
        ProxyError::InvalidOutputCap,
        ProxyError::EndpointNotAllowed,
        ProxyError::DuplicateModel,
        ProxyError::ModelNotFound,
        ProxyError::InvalidSpendGroup,
        ProxyError::BudgetExceeded {
            retry_after: 86_400,
            standing: Standing {
                requests: Some(Window {
                    limit: 60,
                    remaining: 59,
                    reset: Duration::from_secs(1),
                }),
                tokens: None,
            },
        },
        ProxyError::ModelUnpriced,
    ];

    /// No wildcard: a new variant does not compile until it has a place here, and the checks
    /// below fail until `EXAMPLES` (whose length is the variant count) holds it at that place.
    const fn ordinal(error: ProxyError) -> usize {
        use ProxyError::*;
        match error {
            Unauthorized => 0,
            NotFound => 1,
            MethodNotAllowed { .. } => 2,
            ConnectNotSupported => 3,
            Overloaded => 4,
            BadGateway => 5,
            GatewayTimeout => 6,
            PayloadTooLarge => 7,
            RequestTimeout => 8,
            InvalidPath => 9,
            KeysResting { .. } => 10,
            KeysRefused => 11,
            IncompleteBody => 12,
            RateLimited { .. } => 13,
            QuotaExceeded { .. } => 14,
            ModelNotAllowed => 15,
            ModelRequired => 16,
            Internal => 17,
            UnreadablePath => 18,
            RequestExceedsLimit { .. } => 19,
            InvalidOutputCap => 20,
            EndpointNotAllowed => 21,
            DuplicateModel => 22,
            ModelNotFound => 23,
            InvalidSpendGroup => 24,
            BudgetExceeded { .. } => 25,
            ModelUnpriced => 26,
        }
    }

    // Every example at its own place: as many distinct variants as there are, so all of them.
    const _: () = {
        let mut place = 0;
        while place < EXAMPLES.len() {
            assert!(ordinal(EXAMPLES[place]) == place);
            place += 1;
        }
    };

    /// What each answer must carry besides `content-type: application/json`, exactly.
    fn expected_headers(error: ProxyError) -> Vec<(&'static str, &'static str)> {
        use ProxyError::*;
        match error {
            Unauthorized => vec![("www-authenticate", "Bearer")],
            MethodNotAllowed { .. } => vec![("allow", "GET")],
            ConnectNotSupported | RequestTimeout => vec![("connection", "close")],
            Overloaded => vec![("retry-after", "1")],
            KeysResting { .. } => vec![("retry-after", "7")],
            BudgetExceeded { .. } => vec![
                ("retry-after", "86400"),
                ("x-ratelimit-limit-requests", "60"),
                ("x-ratelimit-remaining-requests", "59"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            RateLimited { .. } => vec![
                ("retry-after", "12"),
                ("x-ratelimit-limit-requests", "5"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "59.5s"),
                ("x-ratelimit-limit-concurrency", "2"),
                ("x-ratelimit-remaining-concurrency", "0"),
            ],
            QuotaExceeded { .. } => vec![
                ("retry-after", "3600"),
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "400"),
                ("x-ratelimit-reset-tokens", "36s"),
            ],
            NotFound
            | BadGateway
            | GatewayTimeout
            | PayloadTooLarge
            | InvalidPath
            | UnreadablePath
            | KeysRefused
            | IncompleteBody
            | ModelNotAllowed
            | ModelRequired
            | RequestExceedsLimit { .. }
            | InvalidOutputCap
            | EndpointNotAllowed
            | DuplicateModel
            | ModelNotFound
            | InvalidSpendGroup
            | ModelUnpriced
            | Internal => vec![],
        }
    }

    /// How a row of the README's table names each header an answer carries.
    const HEADER_MENTIONS: [(&str, &str); 5] = [
        ("www-authenticate", "`WWW-Authenticate: Bearer`"),
        ("allow", "`Allow`"),
        ("connection", "`Connection: close`"),
        ("retry-after", "`Retry-After"),
        ("x-ratelimit-", "`x-ratelimit-*`"),
    ];

    /// A row of the error table: status, code, OpenAI type, and the text of its last column.
    struct Row {
        status: u16,
        code: String,
        kind: String,
        when: String,
    }

    /// The rows of the table that holds the `unauthorized` row, without those of plain hyper
    /// answers (no code).
    fn error_table(readme: &str) -> Vec<Row> {
        let lines: Vec<&str> = readme.lines().collect();
        let anchor = lines
            .iter()
            .position(|line| line.starts_with("| 401 | `unauthorized` |"))
            .expect("the error table");
        let start = (0..anchor)
            .rev()
            .find(|&i| !lines[i].starts_with('|'))
            .expect("a line before the table")
            + 1;
        lines[start..]
            .iter()
            .take_while(|line| line.starts_with('|'))
            .filter_map(|line| {
                let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
                let status = cells[0].parse().ok()?;
                let code = cells[1].strip_prefix('`')?.strip_suffix('`')?.to_owned();
                let kind = cells[2].strip_prefix('`')?.strip_suffix('`')?.to_owned();
                Some(Row {
                    status,
                    code,
                    kind,
                    when: cells[3..].join(" | "),
                })
            })
            .collect()
    }

    fn mentioned_headers(row: &Row) -> Vec<&'static str> {
        HEADER_MENTIONS
            .iter()
            .filter(|(_, mention)| row.when.contains(mention))
            .map(|(name, _)| *name)
            .collect()
    }

    /// The header names of an answer as the table names them (`x-ratelimit-*` as one).
    fn header_kinds(error: ProxyError) -> Vec<&'static str> {
        HEADER_MENTIONS
            .iter()
            .filter(|(name, _)| {
                expected_headers(error)
                    .iter()
                    .any(|(header, _)| header.starts_with(name))
            })
            .map(|(name, _)| *name)
            .collect()
    }

    async fn body_of(response: warp::reply::Response) -> Vec<u8> {
        use http_body_util::BodyExt;
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn every_variant_answers_as_its_row_of_the_readme_table_says_in_both_formats() {
        let readme = include_str!("../README.md");
        let rows = error_table(readme);
        let mut matched = vec![false; rows.len()];
        for error in EXAMPLES {
            let answer = error.answer();
            // The row of the same status and code that names the same headers; two variants
            // share 405 `method_not_allowed`, told apart by `Allow` and `Connection: close`.
            let kinds = header_kinds(error);
            let candidates: Vec<usize> = (0..rows.len())
                .filter(|&i| {
                    rows[i].status == answer.status.as_u16()
                        && rows[i].code == answer.code
                        && mentioned_headers(&rows[i]) == kinds
                })
                .collect();
            assert_eq!(
                candidates.len(),
                1,
                "{error:?}: one README row with {} `{}` naming {kinds:?}",
                answer.status,
                answer.code
            );
            let row = &rows[candidates[0]];
            // Refusals of one kind, told apart only by their message, share a row: two spellings of
            // an unreadable path, and the invalid requests (an output cap, a model named twice, a
            // spend grouping that is none).
            let shares_by_design = matches!(
                error,
                ProxyError::UnreadablePath
                    | ProxyError::DuplicateModel
                    | ProxyError::InvalidSpendGroup
            );
            assert!(
                !matched[candidates[0]] || shares_by_design,
                "{error:?} shares a README row"
            );
            matched[candidates[0]] = true;
            assert_eq!(row.kind, answer.kind, "{error:?}: the README's OpenAI type");
            assert!(
                [
                    INVALID_REQUEST,
                    AUTHENTICATION,
                    PERMISSION,
                    RATE_LIMIT,
                    SERVER
                ]
                .contains(&answer.kind),
                "{error:?}"
            );

            let expected: BTreeMap<String, String> = expected_headers(error)
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            for format in [ErrorFormat::Proxy, ErrorFormat::OpenAi] {
                let response = error.into_response(format);
                assert_eq!(response.status(), answer.status, "{error:?} {format:?}");
                let mut headers: BTreeMap<String, String> = response
                    .headers()
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
                    .collect();
                assert_eq!(
                    headers.remove("content-type").as_deref(),
                    Some("application/json"),
                    "{error:?} {format:?}"
                );
                assert_eq!(headers, expected, "{error:?} {format:?}");

                let body = String::from_utf8(body_of(response).await).unwrap();
                let message = serde_json::to_string(answer.message).unwrap();
                // The exact bytes, fields in this order.
                let expected_body = match format {
                    ErrorFormat::Proxy => {
                        let parsed: Value = serde_json::from_str(&body).unwrap();
                        let time = parsed["time"].as_str().unwrap();
                        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
                        format!(
                            "{{\"error\":\"{}\",\"message\":{message},\"time\":\"{time}\"}}",
                            answer.code
                        )
                    }
                    ErrorFormat::OpenAi => format!(
                        "{{\"error\":{{\"message\":{message},\"type\":\"{}\",\"code\":\"{}\",\
                         \"param\":null}}}}",
                        answer.kind, answer.code
                    ),
                };
                assert_eq!(body, expected_body, "{error:?} {format:?}");
            }
        }
        let unmatched: Vec<String> = rows
            .iter()
            .zip(&matched)
            .filter(|(_, matched)| !**matched)
            .map(|(row, _)| format!("{} {}", row.status, row.code))
            .collect();
        assert!(
            unmatched.is_empty(),
            "README rows no variant answers: {unmatched:?}"
        );
    }

    #[test]
    fn a_request_exceeding_a_limit_is_told_which() {
        for (limit, name) in [
            (TokenLimit::PerMinute, "tokens_per_minute"),
            (TokenLimit::PerDay, "tokens_per_day"),
            (TokenLimit::UsdPerDay, "usd_per_day"),
            (TokenLimit::UsdPerMonth, "usd_per_month"),
        ] {
            let message = ProxyError::RequestExceedsLimit { limit }.answer().message;
            assert!(
                message.contains(&format!("this client's {name};")),
                "{message}"
            );
        }
    }

    #[test]
    fn error_format_accepts_its_two_names_in_any_case_and_nothing_else() {
        assert_eq!(ErrorFormat::parse("proxy"), Some(ErrorFormat::Proxy));
        assert_eq!(ErrorFormat::parse("OpenAI"), Some(ErrorFormat::OpenAi));
        assert_eq!(ErrorFormat::parse("openai"), Some(ErrorFormat::OpenAi));
        assert_eq!(ErrorFormat::parse("json"), None);
        assert_eq!(ErrorFormat::parse(""), None);
        assert_eq!(ErrorFormat::default(), ErrorFormat::Proxy);
    }

    #[test]
    fn the_chinese_readme_has_the_same_table() {
        let key = |rows: Vec<Row>| {
            let mut rows: Vec<(u16, String, String, Vec<&str>)> = rows
                .iter()
                .map(|row| {
                    let headers = mentioned_headers(row);
                    (row.status, row.code.clone(), row.kind.clone(), headers)
                })
                .collect();
            rows.sort();
            rows
        };
        assert_eq!(
            key(error_table(include_str!("../README.zh-CN.md"))),
            key(error_table(include_str!("../README.md")))
        );
    }

    #[test]
    fn the_stream_failure_events_are_the_ones_the_readme_shows() {
        for readme in [
            include_str!("../README.md"),
            include_str!("../README.zh-CN.md"),
        ] {
            for format in [ErrorFormat::Proxy, ErrorFormat::OpenAi] {
                let stalled = StreamFailure::Stalled.sse_event(format);
                let line = std::str::from_utf8(&stalled).unwrap();
                assert!(line.ends_with("\n\n"));
                assert!(
                    readme.contains(&format!(
                        "```text\n{}```",
                        line.trim_end_matches('\n').to_owned() + "\n"
                    )),
                    "{line}"
                );
            }
        }
        assert_eq!(
            StreamFailure::Interrupted.sse_event(ErrorFormat::Proxy),
            "data: {\"error\":{\"code\":\"upstream_stream_interrupted\",\"message\":\"The upstream \
             connection broke; the response is incomplete\",\"type\":\"proxy_error\"}}\n\n"
        );
        assert_eq!(
            StreamFailure::Interrupted.sse_event(ErrorFormat::OpenAi),
            "data: {\"error\":{\"message\":\"The upstream connection broke; the response is \
             incomplete\",\"type\":\"server_error\",\"code\":\"upstream_stream_interrupted\",\
             \"param\":null}}\n\n"
        );
        assert!(
            include_str!("../README.md")
                .contains("(`upstream_stream_interrupted` when the connection broke.)")
        );
    }

    #[tokio::test]
    async fn readiness_answers_with_the_readme_shape() {
        let readme = include_str!("../README.md");
        for (readiness, status, limits) in [
            (Readiness::Ready, 200, "local"),
            (Readiness::Draining, 503, "shared"),
            (Readiness::NoUpstreamKey, 503, "local"),
            (Readiness::NoHealthyUpstream, 503, "local"),
        ] {
            let response = readiness.into_response(limits, None);
            assert_eq!(response.status(), status);
            assert_eq!(response.headers().len(), 1);
            assert_eq!(response.headers()["content-type"], "application/json");
            let body = String::from_utf8(body_of(response).await).unwrap();
            let word = readiness.word();
            assert_eq!(
                body,
                format!("{{\"limits\":\"{limits}\",\"status\":\"{word}\"}}")
            );
        }
        assert!(readme.contains("200 `{\"limits\":\"local\",\"status\":\"ready\"}`"));
        assert!(readme.contains("503 `\"status\":\"draining\"`"));
        assert!(readme.contains("`\"status\":\"no_upstream_key\"`"));
        assert!(readme.contains("`\"status\":\"no_healthy_upstream\"`"));
        let with_file = Readiness::NoHealthyUpstream.into_response(
            "local",
            Some([("a".to_string(), "open"), ("b".to_string(), "open")].into()),
        );
        assert_eq!(
            String::from_utf8(body_of(with_file).await).unwrap(),
            r#"{"limits":"local","status":"no_healthy_upstream","upstreams":{"a":"open","b":"open"}}"#
        );
    }
}
