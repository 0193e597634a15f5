//! Per-client limits (the clients file): refusals with exact headers and an honest `Retry-After`, token limits
//! charged before the call, concurrency, and the daily budget.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::clients::{chat_body, metrics, spawn_with_clients};
use crate::helpers::*;

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// `12s`, `11.999s` or `1m0s` as a duration.
fn openai_duration(text: &str) -> Duration {
    let (minutes, seconds) = match text.split_once('m') {
        Some((minutes, seconds)) => (minutes.parse::<u64>().unwrap(), seconds),
        None => (0, text),
    };
    let seconds: f64 = seconds.strip_suffix('s').unwrap().parse().unwrap();
    Duration::from_secs(minutes * 60) + Duration::from_secs_f64(seconds)
}

/// Moves the paused clock on to `at`.
async fn advance_to(at: Instant) {
    tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
}

#[tokio::test]
async fn the_sixth_request_of_a_five_a_minute_client_waits_exactly_as_long_as_it_is_told() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 5\n")
            .await;
    let first_sent = Instant::now();
    let mut first_answered = None;
    for remaining in ["4", "3", "2", "1", "0"] {
        let admitted = app.chat("tok-alice", chat_body("gpt-mock")).await;
        first_answered.get_or_insert_with(Instant::now);
        assert_eq!(admitted.status(), 200);
        // The upstream's own headers (100 / 99, the shared key's) are replaced by the client's.
        assert_eq!(header(&admitted, "x-ratelimit-limit-requests"), "5");
        assert_eq!(
            header(&admitted, "x-ratelimit-remaining-requests"),
            remaining
        );
        assert!(admitted.headers().get("x-ratelimit-limit-tokens").is_none());
    }
    let first_answered = first_answered.unwrap();
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    // Five a minute is one place every 12 s: the first request's place frees 12 s after it.
    assert_eq!(header(&refused, "retry-after"), "12");
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "5");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    // Until all five places are free again: a minute after the first, less the time gone by.
    let reset = openai_duration(header(&refused, "x-ratelimit-reset-requests"));
    assert!(
        reset > Duration::from_secs(59) && reset <= Duration::from_secs(60),
        "{reset:?}"
    );
    assert_json_error(
        refused,
        429,
        "rate_limited",
        "This client is over its rate limit; retry after the time in Retry-After",
    )
    .await;
    assert_eq!(
        app.upstream.requests().len(),
        5,
        "the sixth never went upstream"
    );

    // Just before the time given, still refused; just after it, admitted. The limiter reads
    // tokio's clock: paused here and moved on, rather than waiting twelve seconds.
    tokio::time::pause();
    // Each on a connection of its own: a pooled one has outlived the server's idle timeout in
    // the jump, and would be closed under the request.
    let fresh = || async {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
            .post(app.url("/v1/chat/completions"))
            .bearer_auth("tok-alice")
            .json(&chat_body("gpt-mock"))
            .send()
            .await
            .unwrap()
    };
    let freed = Duration::from_secs(12);
    advance_to(first_sent + freed - Duration::from_millis(500)).await;
    let early = fresh().await;
    assert_eq!(early.status(), 429);
    assert_eq!(header(&early, "retry-after"), "1");
    advance_to(first_answered + freed + Duration::from_millis(20)).await;
    let on_time = fresh().await;
    assert_eq!(on_time.status(), 200);
    assert_eq!(header(&on_time, "x-ratelimit-remaining-requests"), "0");

    let metrics = metrics(&app).await;
    assert!(
        metrics.contains(
            "llm_proxy_limit_refusals_total{client=\"alice\",reason=\"requests_per_minute\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_running_stream_holds_its_estimate_so_a_second_cannot_overshoot_the_token_limit() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 1000\n")
            .await;
    let body = json!({
        "model": "gpt-mock",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 600,
        "messages": [{"role": "user", "content": "hi"}]
    });
    // A token per 4 bytes of body, plus max_tokens.
    let estimate = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as u64 + 600;
    let stream = |chunks: &str| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth("tok-alice")
            .header("x-mock-chunks", chunks)
            .header("x-mock-interval-ms", "50")
            .json(&body)
            .send()
    };
    let first = stream("20").await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "1000");
    let remaining: u64 = header(&first, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert_eq!(remaining, 1000 - estimate);
    let mut first_body = first.bytes_stream();
    assert!(first_body.next().await.is_some());

    // The first has reported no usage yet, but its estimate is charged: the second would
    // overshoot the limit and is refused before it reaches the upstream.
    let second = stream("20").await.unwrap();
    assert_eq!(second.status(), 429);
    let body_of: Value = second.json().await.unwrap();
    assert_eq!(body_of["error"], "rate_limited");
    assert_eq!(app.upstream.streams_started(), 1);

    while let Some(chunk) = first_body.next().await {
        chunk.unwrap();
    }
    // Settled from the usage event (7 prompt + 20 completion): the estimate's rest is given
    // back, so a second stream fits at once.
    assert!(
        eventually(Duration::from_secs(2), async || {
            app.upstream.streams_completed() == 1
        })
        .await
    );
    let third = stream("1").await.unwrap();
    assert_eq!(third.status(), 200);
    let remaining: u64 = header(&third, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(remaining >= 1000 - 27 - estimate, "{remaining}");
    third.bytes().await.unwrap();
}

#[tokio::test]
async fn concurrency_refusals_are_answered_at_once() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 1\n")
            .await;
    let stream = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .header("x-mock-chunks", "10")
        .header("x-mock-interval-ms", "100")
        .json(&json!({"model": "gpt-mock", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let asked = Instant::now();
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_json_error(
        refused,
        429,
        "rate_limited",
        "This client is over its rate limit; retry after the time in Retry-After",
    )
    .await;
    // Other clients are not affected.
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        200
    );
    assert!(stream.text().await.unwrap().ends_with("[DONE]\n\n"));
    // The place is given back when the stream's last byte went out.
    let admitted = eventually(Duration::from_secs(1), async || {
        app.chat("tok-alice", chat_body("gpt-mock")).await.status() == 200
    })
    .await;
    assert!(admitted);
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_from_its_events() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 100000\n")
            .await;
    let body = json!({"model": "gpt-mock", "stream": true});
    let text = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .header("x-mock-chunks", "5")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = text.matches("data:").count() as u64;
    let prompt = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as u64;
    let usage = admin_usage(&app, "alice").await;
    // The prompt estimate and one token per event, [DONE] aside.
    assert_eq!(usage["tokens_today"], prompt + events - 1);
}

pub async fn admin_usage(app: &TestApp, name: &str) -> Value {
    admin_client(&app.url(""), name)
        .await
        .unwrap_or_else(|| panic!("{name} is listed"))["usage"]
        .clone()
}

#[tokio::test]
async fn the_daily_budget_refuses_with_quota_exceeded_until_midnight_utc() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 40\n").await;
    // Each chat is estimated at 16 tokens (its 64-byte body) and settles at 13.
    for _ in 0..2 {
        assert_eq!(
            app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
            200
        );
    }
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(retry.abs_diff(to_midnight) <= 2, "{retry} vs {to_midnight}");
    assert_json_error(
        refused,
        429,
        "quota_exceeded",
        "This client has used its daily token budget; it renews at midnight UTC",
    )
    .await;
    assert_eq!(admin_usage(&app, "alice").await["tokens_today"], 26);
}

/// A chat body naming `model` with `cap` as its `max_tokens`, as the bytes sent.
fn capped_chat(model: &str, cap: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":{cap},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

async fn send_raw(app: &TestApp, token: &str, body: &str) -> reqwest::Response {
    app.request_as(token, reqwest::Method::POST, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A 413 tells no time to come back, and no standing: nothing about it is a rate.
fn assert_no_retry_headers(response: &reqwest::Response) {
    assert!(response.headers().get("retry-after").is_none());
    let paced: Vec<_> = response
        .headers()
        .keys()
        .filter(|name| name.as_str().starts_with("x-ratelimit-"))
        .collect();
    assert!(paced.is_empty(), "{paced:?}");
}

#[tokio::test]
async fn a_request_larger_than_the_daily_budget_is_refused_with_413_and_costs_nothing() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 1000\n").await;
    let refused = send_raw(&app, "tok-alice", &capped_chat("gpt-mock", "5000")).await;
    assert_no_retry_headers(&refused);
    assert_json_error(
        refused,
        413,
        "request_exceeds_limit",
        "The request's token estimate exceeds this client's tokens_per_day; \
         lower max_tokens or shorten the prompt",
    )
    .await;
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
    let usage = admin_usage(&app, "alice").await;
    assert_eq!(usage["tokens_today"], 0);
    assert_eq!(usage["in_flight"], 0);

    // The budget is untouched: a small request goes through, and is the only one counted.
    let small = app.chat("tok-alice", chat_body("gpt-mock")).await;
    assert_eq!(small.status(), 200);
    small.bytes().await.unwrap();
    assert_eq!(admin_usage(&app, "alice").await["tokens_today"], 13);
    let metrics = metrics(&app).await;
    assert!(
        metrics.contains(
            "llm_proxy_limit_refusals_total{client=\"alice\",reason=\"tokens_per_day\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_larger_than_tokens_per_minute_is_refused_with_413_but_exactly_the_limit_fits() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 1000\n")
            .await;
    // A token per 4 bytes of body plus max_tokens: the cap that makes the estimate 1000 exactly
    // (three digits either way, so the body's size is the same).
    let prompt = capped_chat("gpt-mock", "999").len().div_ceil(4);
    let fitting = (1000 - prompt).to_string();
    let over = (1001 - prompt).to_string();
    assert_eq!((fitting.len(), over.len()), (3, 3));

    let refused = send_raw(&app, "tok-alice", &capped_chat("gpt-mock", &over)).await;
    assert_no_retry_headers(&refused);
    assert_json_error(
        refused,
        413,
        "request_exceeds_limit",
        "The request's token estimate exceeds this client's tokens_per_minute; \
         lower max_tokens or shorten the prompt",
    )
    .await;
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
    assert_eq!(admin_usage(&app, "alice").await["tokens_last_minute"], 0);

    // The whole limit at once is the burst a fresh client has.
    let whole = send_raw(&app, "tok-alice", &capped_chat("gpt-mock", &fitting)).await;
    assert_eq!(whole.status(), 200);
    assert_eq!(header(&whole, "x-ratelimit-remaining-tokens"), "0");
    whole.bytes().await.unwrap();
    assert_eq!(app.upstream.requests_started(), 1);
}

#[tokio::test]
async fn an_invalid_max_tokens_is_forwarded_untouched_for_a_client_with_only_a_model_list() {
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\nmodels = [\"gpt-mock\"]\n")
            .await;
    for cap in ["-1", "1.5", "\"100\"", "{\"n\":1}", "18446744073709551616"] {
        let body = capped_chat("gpt-mock", cap);
        let answer = send_raw(&app, "tok-alice", &body).await;
        assert_eq!(answer.status(), 200, "{cap}");
        answer.bytes().await.unwrap();
        let sent = app.upstream.last_request().unwrap();
        assert_eq!(sent.body, body.as_bytes(), "{cap}: the same bytes upstream");
    }
    // The model is still read beside it, and still checked.
    let refused = send_raw(&app, "tok-alice", &capped_chat("gpt-4o", "-1")).await;
    assert_json_error(
        refused,
        403,
        "model_not_allowed",
        "This client may not use the requested model",
    )
    .await;
    assert_eq!(app.upstream.requests_started(), 5);
}

#[tokio::test]
async fn an_invalid_max_tokens_is_refused_for_a_client_with_token_limits() {
    let (app, _) = spawn_with_clients(
        "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 100000\nmodels = [\"gpt-mock\"]\n",
    )
    .await;
    for cap in ["-1", "1.5", "\"100\"", "[1]", "18446744073709551616"] {
        let refused = send_raw(&app, "tok-alice", &capped_chat("gpt-mock", cap)).await;
        assert_json_error(
            refused,
            400,
            "invalid_request",
            "max_tokens, max_completion_tokens and max_output_tokens must be whole numbers of \
             at least 0",
        )
        .await;
    }
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
    assert_eq!(admin_usage(&app, "alice").await["tokens_today"], 0);
    // `null` is the API's own "no cap".
    let uncapped = send_raw(&app, "tok-alice", &capped_chat("gpt-mock", "null")).await;
    assert_eq!(uncapped.status(), 200);
}
