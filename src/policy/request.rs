//! What the policy reads from a request body: the model it names and an estimate of the tokens it
//! will use. Only for clients with a model list or token limits, on the endpoints that take a
//! model (the request's [`crate::vocab::Endpoint`] says which); the body is read once, by the
//! proxy's [`crate::proxy::request::CallerBody`], and the same bytes are forwarded unchanged.

use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use warp::http::{HeaderMap, header};

/// What was read from a body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    pub model: Option<String>,
    /// Where `model` is written in the body, exactly when it is read from there: the top-level
    /// JSON string with its quotes, or the multipart field's value (without the line break
    /// before the next boundary). A renamed model replaces these bytes and no others.
    pub model_span: Option<Range<usize>>,
    /// The prompt's tokens, estimated from the body's size.
    pub prompt: u64,
    /// The output cap the request gives (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`, the largest valid one), 0 without one.
    pub output_cap: u64,
    /// One of those fields is present but not a whole number of at least 0 (negative, a
    /// fraction, a string, an object, beyond `u64`): the upstream will judge the request, but
    /// the proxy cannot estimate it.
    pub invalid_output_cap: bool,
}

impl Inspected {
    /// What is charged before the call.
    pub fn estimate(&self) -> u64 {
        self.prompt.saturating_add(self.output_cap)
    }
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
    is_form_data(content_type(headers))
}

/// Whether a `Content-Type` value (read as text) names `multipart/form-data`, parameters aside.
fn is_form_data(content_type: &str) -> bool {
    // The type ends at the first `;`: a byte search, as short as the value, where `split`
    // would set up a searcher for a value that is usually `application/json`.
    let essence = match content_type.bytes().position(|byte| byte == b';') {
        Some(end) => &content_type[..end],
        None => content_type,
    };
    essence.trim().eq_ignore_ascii_case("multipart/form-data")
}

pub fn inspect(headers: &HeaderMap, body: &[u8]) -> Inspected {
    let content_type = content_type(headers);
    if is_form_data(content_type) {
        let (model, model_span) = boundary(content_type)
            .and_then(|boundary| form_field(body, &boundary, "model"))
            .unzip();
        // An upload's bytes are audio or images, not prompt tokens: no estimate from its size.
        return Inspected {
            model,
            model_span,
            ..Inspected::default()
        };
    }
    let fields = serde_json::from_slice::<JsonFields>(body).unwrap_or_default();
    let (model, model_span) = fields.model.and_then(|raw| json_model(body, raw)).unzip();
    Inspected {
        model,
        model_span,
        prompt: prompt_estimate(body.len()),
        output_cap: fields.output_cap,
        invalid_output_cap: fields.invalid_output_cap,
    }
}

/// The model a top-level `model` value names, when it is a non-empty string (anything else
/// names none), and where that string lies in `body`, its quotes included.
fn json_model(body: &[u8], raw: &RawValue) -> Option<(String, Range<usize>)> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    // The raw value was read as a JSON string already (valid UTF-8): without a backslash (or a
    // control character, which no JSON string holds) there is nothing to decode, and the value
    // is the text between its quotes. Otherwise the escapes are decoded; the value is the
    // string alone, so that reads a few bytes.
    let model = match text.get(1..text.len() - 1) {
        Some(plain) if !plain.bytes().any(|byte| byte == b'\\' || byte < 0x20) => plain.to_string(),
        _ => serde_json::from_str::<String>(text).ok()?,
    };
    if model.is_empty() {
        return None;
    }
    // The raw value is a slice of `body` itself (borrowed, never copied), so its place in the
    // body is the distance between the two; checked, not trusted.
    let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let span = start..start.checked_add(text.len())?;
    (body.get(span.clone())? == text.as_bytes()).then_some((model, span))
}

/// The top-level fields of a JSON body the policy reads, each on its own: a bad value in one (a
/// `max_tokens` of -1) must not hide the others, as one derived struct failing whole would.
/// Every other value is skipped without being built (`IgnoredAny`), so a huge or deeply nested
/// body costs no memory beyond its bytes; `model` is kept as the raw text the body holds, so its
/// place in the body is known without a second pass.
#[derive(Default)]
struct JsonFields<'de> {
    model: Option<&'de RawValue>,
    output_cap: u64,
    invalid_output_cap: bool,
}

impl<'de> Deserialize<'de> for JsonFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<JsonFields<'de>, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = JsonFields<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonFields<'de>, A::Error> {
        let mut fields = JsonFields::default();
        let mut models = 0;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Model => {
                    models += 1;
                    fields.model = Some(map.next_value::<&'de RawValue>()?);
                }
                // A field given twice is taken at its largest: whichever copy the upstream
                // reads, the estimate is not below it.
                Key::OutputCap => match map.next_value::<OutputCap>()? {
                    OutputCap::Absent => {}
                    OutputCap::Valid(cap) => fields.output_cap = fields.output_cap.max(cap),
                    OutputCap::Invalid => fields.invalid_output_cap = true,
                },
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // Upstreams differ on which of two `model` fields they take: two are as good as none.
        if models > 1 {
            fields.model = None;
        }
        Ok(fields)
    }
}

/// A top-level key, as the JSON text spells it once its escapes are decoded.
enum Key {
    Model,
    OutputCap,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "max_tokens" | "max_completion_tokens" | "max_output_tokens" => Key::OutputCap,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// An output cap: `null` is the same as no field (the OpenAI API takes it so); a whole number
/// of at least 0 that fits a `u64` is valid; anything else (serde_json reads a number beyond
/// `u64`, or written with a fraction or an exponent, as a float) is not.
enum OutputCap {
    Absent,
    Valid(u64),
    Invalid,
}

impl<'de> Deserialize<'de> for OutputCap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<OutputCap, D::Error> {
        struct CapVisitor;
        impl<'de> Visitor<'de> for CapVisitor {
            type Value = OutputCap;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("any JSON value")
            }

            fn visit_unit<E: de::Error>(self) -> Result<OutputCap, E> {
                Ok(OutputCap::Absent)
            }

            fn visit_u64<E: de::Error>(self, cap: u64) -> Result<OutputCap, E> {
                Ok(OutputCap::Valid(cap))
            }

            fn visit_i64<E: de::Error>(self, cap: i64) -> Result<OutputCap, E> {
                Ok(u64::try_from(cap).map_or(OutputCap::Invalid, OutputCap::Valid))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<OutputCap, E> {
                Ok(OutputCap::Invalid)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<OutputCap, E> {
                Ok(OutputCap::Invalid)
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<OutputCap, E> {
                Ok(OutputCap::Invalid)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OutputCap, A::Error> {
                skip_seq(seq).map(|()| OutputCap::Invalid)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OutputCap, A::Error> {
                skip_map(map).map(|()| OutputCap::Invalid)
            }
        }
        deserializer.deserialize_any(CapVisitor)
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
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
/// two values they take, so two are as good as none. With it, where its bytes lie in `body`
/// (untrimmed: a new value replaces the whole of the old one).
fn form_field(body: &[u8], boundary: &str, name: &str) -> Option<(String, Range<usize>)> {
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
            let value_start = start + delimiter.len() + split + 4;
            found = Some((
                std::str::from_utf8(value).ok()?.trim().to_string(),
                value_start..value_start + value.len(),
            ));
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
        let model = |fields: &[(&str, &str)]| {
            form_field(body(fields).as_bytes(), "b", "model").map(|(model, _)| model)
        };
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
    fn an_invalid_output_cap_is_told_and_hides_nothing_else() {
        for cap in [
            "-1",
            "1.5",
            "100.0",
            "1e3",
            "18446744073709551616",
            "\"100\"",
            "true",
            "[100]",
            "{\"tokens\":100}",
        ] {
            let body = format!(r#"{{"model":"gpt-4o","max_tokens":{cap},"max_output_tokens":7}}"#);
            let inspected = inspect(&typed("application/json"), body.as_bytes());
            assert_eq!(inspected.model.as_deref(), Some("gpt-4o"), "{cap}");
            assert!(inspected.invalid_output_cap, "{cap}");
            assert_eq!(inspected.output_cap, 7, "{cap}");
        }
        let valid = |body: &str| inspect(&typed("application/json"), body.as_bytes());
        let zero = valid(r#"{"model":"gpt-4o","max_tokens":0}"#);
        assert!(!zero.invalid_output_cap);
        // `null` is the API's "no cap", not an invalid one.
        let null = valid(r#"{"model":"gpt-4o","max_completion_tokens":null}"#);
        assert!(!null.invalid_output_cap);
        assert_eq!(null.output_cap, 0);
        let largest = valid(r#"{"max_tokens":18446744073709551615}"#);
        assert_eq!(largest.output_cap, u64::MAX);
        assert_eq!(largest.estimate(), u64::MAX);
    }

    #[test]
    fn fields_are_read_as_the_upstream_would_read_them() {
        let read = |body: &str| inspect(&typed("application/json"), body.as_bytes());
        // A key's escapes are decoded, as the upstream's parser decodes them.
        let escaped = read(r#"{"mod\u0065l":"gpt-4o","max\u005ftokens":300}"#);
        assert_eq!(escaped.model.as_deref(), Some("gpt-4o"));
        assert_eq!(escaped.output_cap, 300);
        // A field twice: the largest cap, whichever copy the upstream takes; no model.
        let twice = read(r#"{"model":"a","max_tokens":5,"model":"b","max_tokens":900}"#);
        assert_eq!(twice.model, None);
        assert_eq!(twice.output_cap, 900);
        // A model that is not a string names none, and the cap is still read.
        let numbered = read(r#"{"model":4,"max_tokens":20}"#);
        assert_eq!(numbered.model, None);
        assert_eq!(numbered.output_cap, 20);
        // Only top-level fields count.
        let nested = read(r#"{"model":"gpt-4o","metadata":{"model":"x","max_tokens":-1}}"#);
        assert_eq!(nested.model.as_deref(), Some("gpt-4o"));
        assert!(!nested.invalid_output_cap);
        // Not an object, or not JSON at all: nothing read, the size still estimated.
        for body in ["[1,2]", "\"gpt-4o\"", r#"{"model":"gpt-4o"} trailing"#] {
            let inspected = read(body);
            assert_eq!(inspected.model, None, "{body}");
            assert_eq!(inspected.prompt, prompt_estimate(body.len()), "{body}");
        }
    }

    #[test]
    fn a_model_name_is_read_as_json_decodes_it_with_or_without_escapes() {
        for written in [
            r#""gpt-4o-mini""#,
            r#""meta-llama/Llama-3.1-70B-Instruct""#,
            r#""caf\u00e9""#,
            r#""café 日本""#,
            r#""a\"b\\c\/d""#,
            r#""\ud83d\ude00""#,
            r#"" ""#,
        ] {
            let body = format!(r#"{{"model":{written},"n":1}}"#);
            let inspected = inspect(&typed("application/json"), body.as_bytes());
            let decoded: String = serde_json::from_str(written).unwrap();
            assert_eq!(inspected.model, Some(decoded), "{written}");
            assert_eq!(
                inspected.model_span.map(|span| &body[span]),
                Some(written),
                "{written}"
            );
        }
    }

    #[test]
    fn the_span_is_of_the_top_level_model_read_and_of_nothing_else() {
        let body = r#"{"metadata":{"model":"x"},"model" : "gpt-4"}"#;
        let span = inspect(&typed("application/json"), body.as_bytes()).model_span;
        assert_eq!(span.map(|span| &body[span]), Some("\"gpt-4\""));
        // No model read, no span: twice, not a string, empty, nested only, not JSON.
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"a","x":1,"mod\u0065l":"a"}"#,
            r#"{"model":4}"#,
            r#"{"model":null}"#,
            r#"{"model":["gpt-4"]}"#,
            r#"{"model":""}"#,
            r#"{"metadata":{"model":"gpt-4"}}"#,
            r#"{"model":"gpt-4"} trailing"#,
            "not json",
        ] {
            let inspected = inspect(&typed("application/json"), body.as_bytes());
            assert_eq!(
                (inspected.model, inspected.model_span),
                (None, None),
                "{body}"
            );
        }
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
