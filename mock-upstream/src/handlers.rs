//! Routing and response bodies. Everything goes through [`handle`] so that
//! recording, counting and the `x-mock-*` switches apply to every route alike.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::http::header::CONTENT_TYPE;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;

use crate::{InFlight, RecordedRequest, State, sse};

const DEFAULT_CHAT_MODEL: &str = "gpt-mock";
const DEFAULT_EMBEDDING_MODEL: &str = "text-embedding-mock";
const MODELS: [&str; 3] = ["gpt-mock", "gpt-mock-mini", "text-embedding-mock"];
const CREATED: u64 = 1_700_000_000;
/// Fixed so that usage numbers are predictable in tests.
pub(crate) const PROMPT_TOKENS: usize = 7;
const EMBEDDING_DIMENSIONS: usize = 8;

const DEFAULT_CHUNKS: usize = 5;
const DEFAULT_INTERVAL_MS: u64 = 10;
/// Caps on header-supplied numbers: a typo must not overflow a deadline or
/// the event count and take a server thread down with it.
const MAX_CHUNKS: usize = 10_000_000;
const MAX_WAIT_MS: u64 = 3_600_000;

pub(crate) async fn handle(
    method: Method,
    path: FullPath,
    query: Option<String>,
    headers: HeaderMap,
    in_flight: InFlight,
    body: Bytes,
    state: Arc<State>,
) -> Response {
    let response = respond(method, path, query, headers, body, state).await;
    in_flight.answered();
    response
}

async fn respond(
    method: Method,
    path: FullPath,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
    state: Arc<State>,
) -> Response {
    let full_path = path.as_str();
    // The API as mounted: what stands for `/v1` is put back, so routing below is one table.
    let mounted;
    let path = match state.options.mount.as_deref() {
        None => full_path,
        Some(mount) => match full_path.strip_prefix(mount) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                mounted = format!("/v1{rest}");
                mounted.as_str()
            }
            _ => "/not-mounted",
        },
    };

    // Counted on arrival, like recording, so a test can tell that a request
    // reached the upstream even if the client gave up during a delay.
    if method == Method::GET && path == "/v1/models" {
        state.models_fetches.fetch_add(1, Ordering::SeqCst);
    }
    if state.record {
        record(
            &state,
            &method,
            full_path,
            query.as_deref(),
            &headers,
            &body,
        );
    }

    let head_delay = state.head_delay_ms.load(Ordering::SeqCst);
    if head_delay > 0 {
        tokio::time::sleep(Duration::from_millis(head_delay.min(MAX_WAIT_MS))).await;
    }

    if state.options.azure {
        if !headers.contains_key("api-key") {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "Access denied due to missing subscription key",
                "invalid_request_error",
                Some("401"),
            );
        }
        let has_version = query.as_deref().is_some_and(|query| {
            query
                .split('&')
                .any(|pair| pair.starts_with("api-version="))
        });
        if !has_version {
            return bad_request("Missing required query parameter: api-version");
        }
    }

    if let Some(answer) = key_answer(&state, &headers) {
        let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut res = error_response(
            status,
            &format!("mock upstream answer for this key: {}", answer.status),
            "requests",
            None,
        );
        for (name, value) in &answer.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                res.headers_mut().insert(name, value);
            }
        }
        return res;
    }

    if let Some(ms) = header_parse::<u64>(&headers, "x-mock-delay-ms").filter(|&ms| ms > 0) {
        let ms = ms.min(MAX_WAIT_MS);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    if let Some(status) = mock_status(&headers) {
        let message = headers.get("x-mock-message").map(lossy);
        return mock_error(status, message.as_deref());
    }

    // HEAD is routed like GET; hyper drops the body.
    let get_like = method == Method::GET || method == Method::HEAD;
    match path {
        "/v1/chat/completions" if method == Method::POST => chat(&headers, &body, state),
        "/v1/embeddings" if method == Method::POST => embeddings(&body),
        "/v1/models" if get_like => models(&state),
        _ if path.starts_with("/v1/") => match path.strip_prefix("/v1/models/") {
            Some(id) if get_like && !id.is_empty() && !id.contains('/') => model(&state, id),
            _ => echo(&method, path, query.as_deref(), &headers, &body),
        },
        _ => error_response(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({} {})", method, path),
            "invalid_request_error",
            None,
        ),
    }
}

fn record(
    state: &State,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) {
    let recorded = RecordedRequest {
        method: method.as_str().to_owned(),
        path: path.to_owned(),
        query: query.map(str::to_owned),
        headers: headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), lossy(value)))
            .collect(),
        body: body.clone(),
    };
    state.requests.lock().push(recorded);
}

/// The fixed answer for the request's key, if the test set one.
fn key_answer(state: &State, headers: &HeaderMap) -> Option<crate::KeyAnswer> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let key = text("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| text("api-key"))?;
    state
        .key_answers
        .lock()
        .iter()
        .find(|(known, _)| known == key)
        .map(|(_, answer)| answer.clone())
}

fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

fn header_parse<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Informational statuses would confuse hyper and anything above 599 is not
/// HTTP, so those values are ignored rather than honoured.
/// `x-mock-usage: <prompt>,<completion>,<cached>`: the usage a plain chat reports instead of the
/// fixed one (cached prompt tokens in `prompt_tokens_details`).
fn mock_usage(headers: &HeaderMap) -> Option<(u64, u64, u64)> {
    let text = headers.get("x-mock-usage")?.to_str().ok()?;
    let mut numbers = text.split(',').map(|part| part.trim().parse::<u64>().ok());
    let usage = (numbers.next()??, numbers.next()??, numbers.next()??);
    numbers.next().is_none().then_some(usage)
}

fn mock_status(headers: &HeaderMap) -> Option<StatusCode> {
    let code = header_parse::<u16>(headers, "x-mock-status")?;
    if !(200..=599).contains(&code) {
        return None;
    }
    StatusCode::from_u16(code).ok()
}

// ----- responses ---------------------------------------------------------

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut res = Response::new(body.into().into());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn add_headers(res: &mut Response, headers: &[(&'static str, &'static str)]) {
    let map = res.headers_mut();
    for &(name, value) in headers {
        map.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// Serialized through structs rather than `json!` so the fields come out in
/// OpenAI's order (`json!` sorts keys, and turning on serde_json's
/// `preserve_order` would change the proxy's own JSON via feature unification).
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers cannot fail to serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

fn error_response(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            param: None,
            code,
        },
    };
    json_response(status, to_json(&body))
}

/// `message` is the body's message, else one naming the status.
fn mock_error(status: StatusCode, message: Option<&str>) -> Response {
    let (kind, code) = match status.as_u16() {
        429 => ("requests", Some("rate_limit_exceeded")),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let named = format!("mock upstream error {}", status.as_u16());
    let mut res = error_response(status, message.unwrap_or(&named), kind, code);
    add_headers(
        &mut res,
        &[
            ("retry-after", "1"),
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-request-id", "req_mock_error"),
            ("openai-processing-ms", "1"),
        ],
    );
    res
}

fn bad_request(message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

// ----- chat completions --------------------------------------------------

/// Only the fields the mock reacts to; the rest of the body is skipped
/// without building a tree, which keeps the benchmark path cheap.
#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

fn chat(headers: &HeaderMap, body: &Bytes, state: Arc<State>) -> Response {
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => {
            return bad_request(&format!(
                "We could not parse the JSON body of your request. ({err})"
            ));
        }
    };
    // Escaped once here and spliced into every event verbatim.
    let model = Value::from(request.model.as_deref().unwrap_or(DEFAULT_CHAT_MODEL)).to_string();

    if request.stream.unwrap_or(false) {
        let include_usage = request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let plan = sse::Plan {
            model,
            chunks: header_parse(headers, "x-mock-chunks")
                .unwrap_or(DEFAULT_CHUNKS)
                .min(MAX_CHUNKS),
            interval: Duration::from_millis(
                header_parse(headers, "x-mock-interval-ms")
                    .unwrap_or(DEFAULT_INTERVAL_MS)
                    .min(MAX_WAIT_MS),
            ),
            include_usage,
        };
        return sse::response(state, plan);
    }

    let usage = match mock_usage(headers) {
        Some((prompt, completion, cached)) => format!(
            r#"{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}"#,
            prompt.saturating_add(completion)
        ),
        None => format!(
            r#"{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":6,"total_tokens":{}}}"#,
            PROMPT_TOKENS + 6
        ),
    };
    let body = format!(
        concat!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":{created},"model":{model},"#,
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello from the mock upstream.","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"#,
            r#""usage":{usage},"system_fingerprint":null}}"#
        ),
        created = CREATED,
        model = model,
        usage = usage,
    );
    let mut res = json_response(StatusCode::OK, body);
    add_headers(
        &mut res,
        &[
            ("x-request-id", "req_mock_chat"),
            ("openai-processing-ms", "1"),
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "99"),
        ],
    );
    res
}

// ----- models ------------------------------------------------------------

#[derive(Serialize)]
struct List<T> {
    object: &'static str,
    data: Vec<T>,
}

#[derive(Serialize)]
struct Model<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn model_object(id: &str) -> Model<'_> {
    Model {
        id,
        object: "model",
        created: CREATED,
        owned_by: "mock",
    }
}

/// The ids this mock serves: its own list, else [`MODELS`].
fn model_ids(state: &State) -> Vec<&str> {
    match &state.options.models {
        Some(ids) => ids.iter().map(String::as_str).collect(),
        None => MODELS.to_vec(),
    }
}

fn models(state: &State) -> Response {
    let body = List {
        object: "list",
        data: model_ids(state).into_iter().map(model_object).collect(),
    };
    let mut res = json_response(StatusCode::OK, to_json(&body));
    add_headers(&mut res, &[("x-request-id", "req_mock_models")]);
    res
}

fn model(state: &State, id: &str) -> Response {
    if model_ids(state).contains(&id) {
        json_response(StatusCode::OK, to_json(&model_object(id)))
    } else {
        error_response(
            StatusCode::NOT_FOUND,
            &format!("The model '{id}' does not exist"),
            "invalid_request_error",
            Some("model_not_found"),
        )
    }
}

// ----- embeddings --------------------------------------------------------

fn embeddings(body: &Bytes) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => {
            return bad_request(&format!(
                "We could not parse the JSON body of your request. ({err})"
            ));
        }
    };
    let Some(input) = request.get("input") else {
        return bad_request("'input' is a required property");
    };
    let Some(inputs) = embedding_inputs(input) else {
        return bad_request("'input' must be a string, an array of strings or of token arrays");
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_EMBEDDING_MODEL);
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");

    let mut prompt_tokens = 0;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += input.tokens;
            let vector = embedding_vector(&input.seed);
            let embedding = if base64 {
                let floats: Vec<f32> = vector.iter().map(|&x| x as f32).collect();
                Embedding::Base64(base64_f32(&floats))
            } else {
                Embedding::Floats(vector)
            };
            EmbeddingObject {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    let mut res = json_response(StatusCode::OK, to_json(&body));
    add_headers(&mut res, &[("x-request-id", "req_mock_embeddings")]);
    res
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Embedding {
    Floats([f64; EMBEDDING_DIMENSIONS]),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

struct EmbeddingInput {
    /// What the vector is derived from, so equal inputs give equal vectors.
    seed: Vec<u8>,
    tokens: usize,
}

/// Accepts the shapes OpenAI accepts: a string, an array of strings, one
/// token array, or an array of token arrays.
fn embedding_inputs(input: &Value) -> Option<Vec<EmbeddingInput>> {
    fn text(s: &str) -> EmbeddingInput {
        EmbeddingInput {
            seed: s.as_bytes().to_vec(),
            tokens: s.split_whitespace().count().max(1),
        }
    }
    fn token_array(items: &[Value]) -> Option<EmbeddingInput> {
        if !items.iter().all(Value::is_u64) {
            return None;
        }
        Some(EmbeddingInput {
            seed: Value::from(items.to_vec()).to_string().into_bytes(),
            tokens: items.len().max(1),
        })
    }
    match input {
        Value::String(s) => Some(vec![text(s)]),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) if items.iter().all(Value::is_u64) => Some(vec![token_array(items)?]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(text(s)),
                Value::Array(tokens) => token_array(tokens),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Values in [-1, 1] with three decimals, so the JSON stays short.
fn embedding_vector(seed: &[u8]) -> [f64; EMBEDDING_DIMENSIONS] {
    // FNV-1a, then splitmix64 per dimension: tiny, stable across platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in seed {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut out = [0f64; EMBEDDING_DIMENSIONS];
    for (k, slot) in out.iter_mut().enumerate() {
        let mut z = hash.wrapping_add(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(k as u64 + 1));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *slot = ((z % 2001) as f64 - 1000.0) / 1000.0;
    }
    out
}

/// `encoding_format: "base64"` (the Python SDK's default) means
/// little-endian f32s, base64-encoded.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ----- echo --------------------------------------------------------------

fn echo(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let body = Echo {
        object: "echo",
        method: method.as_str(),
        path,
        query,
        body_bytes: body.len(),
        content_type: headers.get(CONTENT_TYPE).map(lossy),
    };
    json_response(StatusCode::OK, to_json(&body))
}

#[derive(Serialize)]
struct Echo<'a> {
    object: &'static str,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    body_bytes: usize,
    content_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_matches_reference() {
        // 1.0f32 LE = 00 00 80 3f; two of them = "AACAPwAAgD8="
        assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0, 1.0]), "AACAPwAAgD8AAIA/");
    }

    #[test]
    fn embedding_is_deterministic_and_bounded() {
        let a = embedding_vector(b"hello");
        assert_eq!(a, embedding_vector(b"hello"));
        assert_ne!(a, embedding_vector(b"hello!"));
        assert!(a.iter().all(|x| (-1.0..=1.0).contains(x)));
    }

    #[test]
    fn embedding_input_shapes() {
        assert_eq!(embedding_inputs(&json!("a b c")).map(|v| v.len()), Some(1));
        assert_eq!(
            embedding_inputs(&json!(["a", "b"])).map(|v| v.len()),
            Some(2)
        );
        assert_eq!(
            embedding_inputs(&json!([1, 2, 3])).map(|v| v.len()),
            Some(1)
        );
        assert_eq!(
            embedding_inputs(&json!([[1], [2, 3]])).map(|v| v.len()),
            Some(2)
        );
        assert!(embedding_inputs(&json!([])).is_none());
        assert!(embedding_inputs(&json!(5)).is_none());
        assert!(embedding_inputs(&json!(["a", 5])).is_none());
    }
}
