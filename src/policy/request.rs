//! What the policy reads from a request body: the model it names and an estimate of the tokens it
//! will use. Only for clients with a model list or token limits, on the endpoints that take a
//! model (the request's [`crate::vocab::Endpoint`] says which); the body is read once, by the
//! proxy's [`crate::proxy::request::CallerBody`], and the same bytes are forwarded unchanged.

use serde::Deserialize;
use warp::http::{HeaderMap, header};

/// What was read from a body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    pub model: Option<String>,
    /// The prompt's tokens, estimated from the body's size.
    pub prompt: u64,
    /// The output cap the request gives (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`), 0 without one.
    pub output_cap: u64,
}

impl Inspected {
    /// What is charged before the call.
    pub fn estimate(&self) -> u64 {
        self.prompt.saturating_add(self.output_cap)
    }
}

#[derive(Deserialize)]
struct JsonFields {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// The prompt estimate: a token per 4 bytes of the JSON body, structure included. Cheap, never
/// below the real prompt for ordinary text (a token is about 4 characters of English, and the
/// JSON around the text only adds bytes), and settled from the answer's `usage` anyway.
pub fn prompt_estimate(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

/// Whether the body is a form upload (RFC 7578), as its `Content-Type` says.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    content_type(headers)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
}

pub fn inspect(headers: &HeaderMap, body: &[u8]) -> Inspected {
    let content_type = content_type(headers);
    if is_multipart(headers) {
        // An upload's bytes are audio or images, not prompt tokens: no estimate from its size.
        return Inspected {
            model: boundary(content_type).and_then(|boundary| form_field(body, &boundary, "model")),
            ..Inspected::default()
        };
    }
    match serde_json::from_slice::<JsonFields>(body) {
        Ok(fields) => {
            let output = [
                fields.max_tokens,
                fields.max_completion_tokens,
                fields.max_output_tokens,
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
            Inspected {
                model: fields.model.filter(|model| !model.is_empty()),
                prompt: prompt_estimate(body.len()),
                output_cap: output,
            }
        }
        Err(_) => Inspected {
            model: None,
            prompt: prompt_estimate(body.len()),
            output_cap: 0,
        },
    }
}

/// What a realtime session's JSON body names: its top-level `model` and its `session.model`
/// (client secrets nest the session, session creation is the session). Empty names read as none.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionModels {
    pub top: Option<String>,
    pub nested: Option<String>,
}

#[derive(Deserialize)]
struct SessionFields {
    model: Option<String>,
    session: Option<NestedSession>,
}

#[derive(Deserialize)]
struct NestedSession {
    model: Option<String>,
}

/// The models a realtime session's body names; `None` when it is not a JSON object with a
/// string in each of the two places it fills (a name given twice included, which upstream
/// parsers settle differently): then nothing in it can be relied on.
pub fn session_models(body: &[u8]) -> Option<SessionModels> {
    let fields: SessionFields = serde_json::from_slice(body).ok()?;
    let named = |model: Option<String>| model.filter(|model| !model.is_empty());
    Some(SessionModels {
        top: named(fields.model),
        nested: named(fields.session.and_then(|session| session.model)),
    })
}

fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|parameter| {
        let (name, value) = parameter.trim().split_once('=')?;
        name.eq_ignore_ascii_case("boundary")
            .then(|| value.trim_matches('"').to_string())
            .filter(|boundary| !boundary.is_empty())
    })
}

/// The value of the form field `name` in a multipart body (RFC 7578), if it is text and there
/// is exactly one: field names are case-sensitive, and upstream frameworks differ on which of
/// two values they take, so two are as good as none.
fn form_field(body: &[u8], boundary: &str, name: &str) -> Option<String> {
    let delimiter = format!("--{boundary}");
    let wanted = format!("name=\"{name}\"");
    let mut found = None;
    let mut parts = memchr::memmem::find_iter(body, delimiter.as_bytes()).peekable();
    while let Some(start) = parts.next() {
        let Some(&end) = parts.peek() else {
            break;
        };
        let part = &body[start + delimiter.len()..end];
        let Some(split) = memchr::memmem::find(part, b"\r\n\r\n") else {
            continue;
        };
        let (head, value) = (&part[..split], &part[split + 4..]);
        let head = String::from_utf8_lossy(head);
        let is_field = head.lines().any(|line| {
            line.to_ascii_lowercase()
                .starts_with("content-disposition:")
                && line.split(';').any(|item| item.trim() == wanted)
        });
        if is_field {
            if found.is_some() {
                return None;
            }
            let value = value.strip_suffix(b"\r\n").unwrap_or(value);
            found = Some(std::str::from_utf8(value).ok()?.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_model_fields_or_another_case_read_as_no_model() {
        let body = |fields: &[(&str, &str)]| {
            let mut body = String::new();
            for (name, value) in fields {
                body.push_str(&format!(
                    "--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                ));
            }
            body.push_str("--b--\r\n");
            body
        };
        let model = |fields: &[(&str, &str)]| form_field(body(fields).as_bytes(), "b", "model");
        assert_eq!(
            model(&[("model", "whisper-1")]).as_deref(),
            Some("whisper-1")
        );
        assert_eq!(model(&[("MODEL", "whisper-1")]), None);
        assert_eq!(model(&[("model", "whisper-1"), ("model", "gpt-4o")]), None);
        assert_eq!(
            model(&[("MODEL", "whisper-1"), ("model", "gpt-4o")]).as_deref(),
            Some("gpt-4o")
        );
    }
    use warp::http::HeaderValue;

    fn typed(content_type: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers
    }

    #[test]
    fn json_bodies_give_their_model_and_output_cap() {
        let body = br#"{"model":"gpt-4o","max_completion_tokens":100,"messages":[]}"#;
        let inspected = inspect(&typed("application/json"), body);
        assert_eq!(inspected.model.as_deref(), Some("gpt-4o"));
        assert_eq!(inspected.estimate(), prompt_estimate(body.len()) + 100);
        assert_eq!(inspect(&HeaderMap::new(), b"not json").model, None);
    }

    #[test]
    fn a_session_body_gives_the_models_of_both_places() {
        let read = |body: &str| session_models(body.as_bytes());
        let nested = read(r#"{"session":{"type":"realtime","model":"gpt-realtime"}}"#).unwrap();
        assert_eq!(nested.nested.as_deref(), Some("gpt-realtime"));
        assert_eq!(nested.top, None);
        let both = read(r#"{"model":"a","session":{"model":"b"}}"#).unwrap();
        assert_eq!(
            (both.top.as_deref(), both.nested.as_deref()),
            (Some("a"), Some("b"))
        );
        assert_eq!(read(r#"{"model":""}"#), Some(SessionModels::default()));
        for unreadable in [
            r#"{"session":{"model":"a","model":"b"}}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"session":"gpt-4"}"#,
            r#"{"session":{"model":["gpt-4"]}}"#,
            "not json",
        ] {
            assert_eq!(read(unreadable), None, "{unreadable}");
        }
    }

    #[test]
    fn multipart_bodies_give_their_model_field() {
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
            Content-Type: audio/wav\r\n\r\nRIFF model\r\n--XyZ\r\n\
            Content-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        let inspected = inspect(&typed("multipart/form-data; boundary=\"XyZ\""), body);
        assert_eq!(inspected.model.as_deref(), Some("whisper-1"));
        assert_eq!(inspected.estimate(), 0);
        let without = inspect(&typed("multipart/form-data; boundary=other"), body);
        assert_eq!(without.model, None);
    }
}
