//! The model renamed on its way upstream, where an alias or an upstream's own name for a model
//! says so: the request's `model` value changes and not one other byte of the body or query, so
//! what the caller wrote (key order, spacing, escapes, numbers) reaches the upstream as written.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use url::form_urlencoded;
use warp::http::HeaderMap;

use crate::policy::request::is_multipart;

/// `body` with the bytes at `span` (the [`crate::policy::request::Inspected::model_span`] of
/// this very body) replaced by `new_name`: as a JSON string, quotes and escapes included, in a
/// JSON body; as it is in a form upload, where a field's value is raw bytes. A span that does not
/// lie in the body (it never does, read from the same body) leaves the body as it is.
pub fn body(headers: &HeaderMap, body: &Bytes, span: Range<usize>, new_name: &str) -> Bytes {
    let (Some(before), Some(after)) = (body.get(..span.start), body.get(span.end..)) else {
        return body.clone();
    };
    let json;
    let value = if is_multipart(headers) {
        new_name
    } else {
        // `Value`'s Display writes the string as serde_json serialises it, and cannot fail.
        json = serde_json::Value::from(new_name).to_string();
        &json
    };
    let mut renamed = BytesMut::with_capacity(before.len() + value.len() + after.len());
    renamed.extend_from_slice(before);
    renamed.extend_from_slice(value.as_bytes());
    renamed.extend_from_slice(after);
    renamed.freeze()
}

/// `query` (without its `?`) with the value of every `model` parameter (its name read as a form
/// decodes it, so `%6Dodel` too) set to `new_name`, form-urlencoded. Each other parameter, and
/// the name of `model` as it was spelled, stays byte for byte where it was.
pub fn query(query: &str, new_name: &str) -> String {
    let value: String = form_urlencoded::byte_serialize(new_name.as_bytes()).collect();
    let mut renamed = String::with_capacity(query.len() + value.len());
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            renamed.push('&');
        }
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        let is_model = !name.is_empty()
            && form_urlencoded::parse(name.as_bytes())
                .next()
                .is_some_and(|(decoded, _)| decoded == "model");
        if is_model {
            renamed.push_str(name);
            renamed.push('=');
            renamed.push_str(&value);
        } else {
            renamed.push_str(pair);
        }
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::request::inspect;
    use warp::http::{HeaderValue, header};

    fn typed(content_type: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers
    }

    /// Renames the model `body` names to `new_name`, as the proxy would: inspect, then replace.
    /// Checks that the bytes before and after the value are the original ones.
    fn renamed(headers: &HeaderMap, body: &[u8], new_name: &str) -> Vec<u8> {
        let span = inspect(headers, body)
            .model_span
            .expect("the body names one model");
        let out = super::body(
            headers,
            &Bytes::copy_from_slice(body),
            span.clone(),
            new_name,
        );
        let suffix = &body[span.end..];
        assert_eq!(&out[..span.start], &body[..span.start], "the bytes before");
        assert_eq!(&out[out.len() - suffix.len()..], suffix, "the bytes after");
        out.to_vec()
    }

    fn json(body: &str, new_name: &str) -> String {
        let out = renamed(&typed("application/json"), body.as_bytes(), new_name);
        String::from_utf8(out).expect("UTF-8 in, UTF-8 out")
    }

    #[test]
    fn a_json_model_is_renamed_wherever_it_stands() {
        assert_eq!(
            json(r#"{"model":"gpt-4","messages":[]}"#, "gpt-4o"),
            r#"{"model":"gpt-4o","messages":[]}"#
        );
        assert_eq!(
            json(r#"{"messages":[],"model":"fast"}"#, "gpt-4o-mini"),
            r#"{"messages":[],"model":"gpt-4o-mini"}"#
        );
        assert_eq!(
            json(
                r#"{"stream":true,"model":"llama-3.1-70b","max_tokens":5}"#,
                "meta-llama/Llama-3.1-70B-Instruct"
            ),
            r#"{"stream":true,"model":"meta-llama/Llama-3.1-70B-Instruct","max_tokens":5}"#
        );
    }

    #[test]
    fn spacing_around_the_value_is_kept() {
        let body = "{\n  \"model\" :\t \"gpt-4\"  ,\r\n  \"n\": 1.50e0\n}\n";
        assert_eq!(
            json(body, "gpt-4o"),
            "{\n  \"model\" :\t \"gpt-4o\"  ,\r\n  \"n\": 1.50e0\n}\n"
        );
        let span = inspect(&typed("application/json"), body.as_bytes())
            .model_span
            .unwrap();
        assert_eq!(&body[span], "\"gpt-4\"");
    }

    #[test]
    fn escapes_are_read_in_the_old_name_and_written_in_the_new() {
        let body = r#"{"model":"a\"b\u00e9\\","x":"\u00e9"}"#;
        let inspected = inspect(&typed("application/json"), body.as_bytes());
        assert_eq!(inspected.model.as_deref(), Some("a\"bé\\"));
        assert_eq!(json(body, "c\"d"), r#"{"model":"c\"d","x":"\u00e9"}"#);
        assert_eq!(
            json(body, "模型/ü\n\u{1}"),
            r#"{"model":"模型/ü\n\u0001","x":"\u00e9"}"#
        );
        // The key itself written with an escape is still the top-level `model`.
        assert_eq!(
            json(r#"{"mod\u0065l":"gpt-4"}"#, "gpt-4o"),
            r#"{"mod\u0065l":"gpt-4o"}"#
        );
        // A name in other scripts, as the body gave it, is replaced whole.
        assert_eq!(json(r#"{"model":"модель"}"#, "m"), r#"{"model":"m"}"#);
    }

    #[test]
    fn only_the_top_level_model_is_renamed() {
        let body = r#"{"metadata":{"model":"gpt-4"},"tools":[{"model":"gpt-4"}],"model":"gpt-4","session":{"model":"gpt-4"}}"#;
        assert_eq!(
            json(body, "gpt-4o"),
            r#"{"metadata":{"model":"gpt-4"},"tools":[{"model":"gpt-4"}],"model":"gpt-4o","session":{"model":"gpt-4"}}"#
        );
        let span = inspect(&typed("application/json"), body.as_bytes())
            .model_span
            .unwrap();
        assert_eq!(span.start, body.find(r#""gpt-4","session""#).unwrap());
    }

    fn form(fields: &[(&str, &str)]) -> String {
        let mut body = String::new();
        for (name, value) in fields {
            body.push_str(&format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
            ));
            if *name == "file" {
                body.push_str("Content-Type: audio/wav\r\n");
            }
            body.push_str(&format!("\r\n{value}\r\n"));
        }
        body.push_str("--XyZ--\r\n");
        body
    }

    #[test]
    fn a_form_model_field_is_renamed_wherever_it_stands() {
        let headers = typed("multipart/form-data; boundary=XyZ");
        let file = ("file", "RIFF\r\nmodel\r\n\"whisper\"");
        let model = ("model", "whisper");
        let language = ("language", "en");
        for fields in [
            [model, file, language],
            [file, model, language],
            [file, language, model],
        ] {
            let expected: Vec<_> = fields
                .iter()
                .map(|&(name, value)| match name {
                    "model" => (name, "whisper-large-v3 \"x\""),
                    _ => (name, value),
                })
                .collect();
            let out = renamed(&headers, form(&fields).as_bytes(), "whisper-large-v3 \"x\"");
            assert_eq!(String::from_utf8(out).unwrap(), form(&expected));
        }
    }

    #[test]
    fn a_form_value_is_replaced_whole_and_the_line_break_kept() {
        let headers = typed("multipart/form-data; boundary=\"XyZ\"");
        let body = form(&[("model", " whisper-1 ")]);
        let inspected = inspect(&headers, body.as_bytes());
        assert_eq!(inspected.model.as_deref(), Some("whisper-1"));
        assert_eq!(&body[inspected.model_span.unwrap()], " whisper-1 ");
        let out = renamed(&headers, body.as_bytes(), "w");
        assert_eq!(String::from_utf8(out).unwrap(), form(&[("model", "w")]));
        let twice = form(&[("model", "a"), ("model", "b")]);
        assert_eq!(inspect(&headers, twice.as_bytes()).model_span, None);
    }

    #[test]
    fn the_query_model_alone_is_replaced() {
        assert_eq!(query("model=gpt-4", "gpt-4o"), "model=gpt-4o");
        assert_eq!(
            query("a=1&model=gpt-4&b=%20x+y&c", "gpt-4o"),
            "a=1&model=gpt-4o&b=%20x+y&c"
        );
        // The name as the caller spelled it, the value encoded as a form encodes it.
        assert_eq!(
            query("%6Dodel=gpt%2D4&z=", "meta-llama/Llama 3 é&x=y"),
            "%6Dodel=meta-llama%2FLlama+3+%C3%A9%26x%3Dy&z="
        );
        assert_eq!(
            query("x=model&models=a&model&mode=l", "m"),
            "x=model&models=a&model=m&mode=l"
        );
        assert_eq!(query("model=a&&model=b", "c"), "model=c&&model=c");
        assert_eq!(query("", "m"), "");
    }

    #[test]
    fn a_span_outside_the_body_changes_nothing() {
        let body = Bytes::from_static(br#"{"model":"a"}"#);
        let headers = typed("application/json");
        assert_eq!(super::body(&headers, &body, 5..40, "b"), body);
        assert_eq!(super::body(&headers, &body, 40..41, "b"), body);
    }
}
