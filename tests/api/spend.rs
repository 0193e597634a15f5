//! What each request cost, and seeing spend: the real binary in front of mock upstreams that
//! report chosen usage (cached and reasoning tokens, streams, the Responses API, embeddings),
//! each cost checked to the nano-dollar against the hand-computed value on the access line, in
//! `/admin/spend` and in the metrics; the ledger across a restart (`STATE_DIR`) and across two
//! replicas (Redis).

use std::path::Path;
use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use serde_json::{Value, json};

use crate::clients::scratch_dir;
use crate::helpers::*;
use crate::process::RunningProxy;
use crate::redis_server::RedisServer;

const CLIENTS: &str =
    "[clients.alice]\ntoken = \"tok-alice\"\n\n[clients.bob]\ntoken = \"tok-bob\"\n";

/// LiteLLM's format, for a model the tables lack: $3/M in, $0.30/M cached, $15/M out.
const LITELLM: &str = r#"{"claude-x": {"input_cost_per_token": 3e-06, "cache_read_input_token_cost": 3e-07, "output_cost_per_token": 1.5e-05, "litellm_provider": "anthropic"}}"#;

/// Two upstreams: `openai` serves the models `[prices]` and the LiteLLM file price (and
/// `free-*`, which nothing prices); `azure` serves `gpt-4o-eu`, with a price of its own that
/// wins over the shared one. `fast` is an alias of `gpt-4o`.
fn upstreams_file(dir: &Path, openai: &MockUpstream, azure: &MockUpstream) -> String {
    let litellm = dir.join("model_prices.json");
    std::fs::write(&litellm, LITELLM).unwrap();
    for name in ["openai", "azure"] {
        std::fs::write(dir.join(format!("{name}.keys")), format!("sk-{name}\n")).unwrap();
    }
    let file = dir.join("upstreams.toml");
    let text = format!(
        r#"default = "openai"
prices_file = {litellm:?}

[prices]
"gpt-4o" = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}
"gpt-4o-eu" = {{ input = 2.50, output = 10.00 }}
"o3*" = {{ input = 2.00, cached_input = 0.50, output = 8.00 }}
"text-embedding-3-small" = {{ input = 0.02 }}

[upstreams.openai]
base_url = "{openai}/v1"
keys_file = {openai_keys:?}
models = ["gpt-4o", "o3*", "text-embedding-3-small", "claude-x", "free-*"]

[upstreams.azure]
base_url = "{azure}/v1"
keys_file = {azure_keys:?}
models = ["gpt-4o-eu"]

[upstreams.azure.prices]
"gpt-4o-eu" = {{ input = 2.75, cached_input = 1.375, output = 11.00 }}

[aliases]
"fast" = "gpt-4o"
"#,
        openai = openai.base_url(),
        azure = azure.base_url(),
        openai_keys = dir.join("openai.keys"),
        azure_keys = dir.join("azure.keys"),
    );
    std::fs::write(&file, text).unwrap();
    file.to_str().unwrap().to_string()
}

struct Fleet {
    dir: std::path::PathBuf,
    file: String,
    _mocks: (MockUpstream, MockUpstream),
}

async fn fleet(name: &str) -> Fleet {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("clients.toml"), CLIENTS).unwrap();
    let mocks = (MockUpstream::start().await, MockUpstream::start().await);
    let file = upstreams_file(&dir, &mocks.0, &mocks.1);
    Fleet {
        dir,
        file,
        _mocks: mocks,
    }
}

impl Fleet {
    fn proxy(&self) -> Proxy {
        Proxy::new()
            .envs(&[
                ("UPSTREAMS_FILE", &self.file),
                ("ADMIN_TOKEN", ADMIN_TOKEN),
                ("METRICS_TOKEN", ADMIN_TOKEN),
                ("STATE_DIR", self.dir.join("state").to_str().unwrap()),
            ])
            .clients_file(&self.dir.join("clients.toml"))
            .in_dir(&self.dir)
    }
}

/// A request to `path` as `token`, the upstream told to report `usage`; its answer read whole.
async fn call(base: &str, token: &str, path: &str, body: Value, usage: Value) {
    let answer = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("x-mock-usage", usage.to_string())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{path} {body}");
    answer.bytes().await.unwrap();
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// The next access line's `cost_usd`.
async fn next_cost(proxy: &mut RunningProxy) -> String {
    let line = proxy
        .log_line_with(&[" /v1/", " cost_usd="], Duration::from_secs(5))
        .await
        .expect("an access line");
    line.split(" cost_usd=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string()
}

async fn admin_spend(base: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base}/admin/spend{query}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

/// `/admin/spend` grouped `by`: (key, nano-dollars this month, nano-dollars today, requests
/// today), in the order given.
async fn spend_by(base: &str, by: &str) -> Vec<(String, u64, u64, u64)> {
    let answer = admin_spend(base, &format!("?by={by}")).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["by"], by);
    let today = today();
    assert_eq!(body["day"], today.as_str());
    assert_eq!(body["month"], &today[..7]);
    body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["key"].as_str().unwrap().to_string(),
                nanos(&group["usd_this_month"]),
                nanos(&group["usd_today"]),
                group["requests_today"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Dollars as a JSON number, in nano-dollars: a number of dollars off by less than a
/// nano-dollar is that amount.
fn nanos(usd: &Value) -> u64 {
    (usd.as_f64().unwrap() * 1e9).round() as u64
}

fn today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_string()
}

async fn metrics(base: &str) -> String {
    reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series of the exposition, in nano-dollars (`None` when absent).
fn series_nanos(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| (value.parse::<f64>().unwrap() * 1e9).round() as u64)
}

/// The worked cases, each cost by hand in micro-dollars (prices per million tokens are
/// micro-dollars per token):
/// 1. alice, `gpt-4o`, 1000 prompt (400 cached), 200 completion (150 of them reasoning):
///    600 x 2.50 + 400 x 1.25 + 200 x 10 = 4000 -> $0.004000
/// 2. alice, `o3-mini` (the `o3*` entry) streamed: 2000 prompt (1000 cached), 500 completion:
///    1000 x 2.00 + 1000 x 0.50 + 500 x 8 = 6500 -> $0.006500
/// 3. bob, the Responses API, `fast` (the alias of `gpt-4o`): 100 in, 50 out:
///    100 x 2.50 + 50 x 10 = 750 -> $0.000750
/// 4. bob, embeddings of `text-embedding-3-small`: 12345 tokens x 0.02 = 246.9 -> $0.000247
/// 5. bob, `gpt-4o-eu` at azure, its own prices: 1000 x 2.75 + 100 x 11 = 3850 -> $0.003850
///    (the shared table would say 3500)
/// 6. alice, `claude-x` from the LiteLLM file: 800 x 3 + 200 x 0.30 + 100 x 15 = 3960 ->
///    $0.003960
/// 7. alice, `free-1`: nothing prices it: served, `cost_usd=-`, counted as unpriced.
async fn run_the_worked_cases(base: &str, proxy: &mut RunningProxy) {
    let cases: [(&str, &str, Value, Value, &str); 7] = [
        (
            "tok-alice",
            "/v1/chat/completions",
            chat("gpt-4o"),
            json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                   "prompt_tokens_details": {"cached_tokens": 400},
                   "completion_tokens_details": {"reasoning_tokens": 150}}),
            "0.004000",
        ),
        (
            "tok-alice",
            "/v1/chat/completions",
            json!({"model": "o3-mini", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi"}]}),
            json!({"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
                   "prompt_tokens_details": {"cached_tokens": 1000},
                   "completion_tokens_details": {"reasoning_tokens": 300}}),
            "0.006500",
        ),
        (
            "tok-bob",
            "/v1/responses",
            json!({"model": "fast", "input": "hi"}),
            json!({"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": 150}),
            "0.000750",
        ),
        (
            "tok-bob",
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hi"}),
            json!({"prompt_tokens": 12345, "total_tokens": 12345}),
            "0.000247",
        ),
        (
            "tok-bob",
            "/v1/chat/completions",
            chat("gpt-4o-eu"),
            json!({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}),
            "0.003850",
        ),
        (
            "tok-alice",
            "/v1/chat/completions",
            chat("claude-x"),
            json!({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                   "prompt_tokens_details": {"cached_tokens": 200}}),
            "0.003960",
        ),
        (
            "tok-alice",
            "/v1/chat/completions",
            chat("free-1"),
            json!({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}),
            "-",
        ),
    ];
    for (token, path, body, usage, cost) in cases {
        call(base, token, path, body.clone(), usage).await;
        assert_eq!(next_cost(proxy).await, cost, "{path} {body}");
    }
}

#[tokio::test]
async fn each_request_costs_what_its_usage_and_prices_say_to_the_nano_dollar() {
    let fleet = fleet("spend-cases").await;
    let mut proxy = fleet.proxy().start_binary().await;
    let base = proxy.url("");
    run_the_worked_cases(&base, &mut proxy).await;

    assert_eq!(
        spend_by(&base, "client").await,
        [
            ("alice".to_string(), 14_460_000, 14_460_000, 3),
            ("bob".to_string(), 4_846_900, 4_846_900, 3),
        ]
    );
    assert_eq!(
        spend_by(&base, "model").await,
        [
            ("o3*".to_string(), 6_500_000, 6_500_000, 1),
            ("gpt-4o".to_string(), 4_750_000, 4_750_000, 2),
            ("claude-x".to_string(), 3_960_000, 3_960_000, 1),
            ("gpt-4o-eu".to_string(), 3_850_000, 3_850_000, 1),
            ("text-embedding-3-small".to_string(), 246_900, 246_900, 1),
        ]
    );
    assert_eq!(
        spend_by(&base, "upstream").await,
        [
            ("openai".to_string(), 15_456_900, 15_456_900, 5),
            ("azure".to_string(), 3_850_000, 3_850_000, 1),
        ]
    );

    let text = metrics(&base).await;
    let spend = |client: &str, upstream: &str, model: &str| {
        series_nanos(
            &text,
            &format!(
                "llm_proxy_spend_usd_total{{client=\"{client}\",upstream=\"{upstream}\",model=\"{model}\"}}"
            ),
        )
    };
    assert_eq!(spend("alice", "openai", "gpt-4o"), Some(4_000_000));
    assert_eq!(spend("alice", "openai", "o3*"), Some(6_500_000));
    assert_eq!(spend("bob", "openai", "gpt-4o"), Some(750_000));
    assert_eq!(
        spend("bob", "openai", "text-embedding-3-small"),
        Some(246_900)
    );
    assert_eq!(spend("bob", "azure", "gpt-4o-eu"), Some(3_850_000));
    assert_eq!(spend("alice", "openai", "claude-x"), Some(3_960_000));
    assert!(
        text.lines().any(|line| line
            == "llm_proxy_unpriced_requests_total{upstream=\"openai\",model=\"free-*\"} 1"),
        "{text}"
    );
    // The unpriced request cost nothing anybody can see as $0.
    assert!(!text.contains("model=\"free-1\""), "{text}");
}

#[tokio::test]
async fn made_up_model_names_make_no_new_series() {
    let fleet = fleet("spend-names").await;
    let mut proxy = fleet.proxy().start_binary().await;
    let base = proxy.url("");
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11});
    for invented in ["free-a", "free-b", "o3-x1", "o3-x2"] {
        call(
            &base,
            "tok-alice",
            "/v1/chat/completions",
            chat(invented),
            usage.clone(),
        )
        .await;
        next_cost(&mut proxy).await;
    }
    let text = metrics(&base).await;
    for invented in ["free-a", "free-b", "o3-x1", "o3-x2"] {
        assert!(!text.contains(invented), "{invented} in:\n{text}");
    }
    assert!(
        text.lines().any(|line| line
            == "llm_proxy_unpriced_requests_total{upstream=\"openai\",model=\"free-*\"} 2"),
        "{text}"
    );
    // 2 x (10 x 2.00 + 1 x 8) micro-dollars under the pattern that priced them.
    assert_eq!(
        series_nanos(
            &text,
            "llm_proxy_spend_usd_total{client=\"alice\",upstream=\"openai\",model=\"o3*\"}"
        ),
        Some(56_000)
    );
}

#[tokio::test]
async fn admin_spend_takes_three_groupings_and_refuses_another() {
    let fleet = fleet("spend-admin").await;
    let proxy = fleet.proxy().start_binary().await;
    let base = proxy.url("");
    // No spend yet: the day and month, and no groups.
    let body: Value = admin_spend(&base, "").await.json().await.unwrap();
    assert_eq!(
        body,
        json!({"by": "client", "day": today(), "month": &today()[..7], "groups": []})
    );
    let error = admin_spend(&base, "?by=team").await;
    assert_eq!(error.status(), 400);
    let error: Value = error.json().await.unwrap();
    assert_eq!(error["error"], "invalid_request");
    assert_eq!(error["message"], "by must be client, model or upstream");
    assert_rfc3339(error["time"].as_str().unwrap());
    assert_eq!(
        admin_spend(&base, "?by=model&by=client").await.status(),
        400
    );
    let anonymous = reqwest::Client::new()
        .get(format!("{base}/admin/spend"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let post = reqwest::Client::new()
        .post(format!("{base}/admin/spend"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET");
}

#[tokio::test]
async fn without_admin_token_admin_spend_does_not_exist() {
    let app = spawn_app(&[("ADMIN_TOKEN", "")]).await;
    let answer = app
        .client
        .get(app.url("/admin/spend"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
}

/// One upstream that serves every model and a caller without limits: the body is not read, so
/// the model a cost is priced as is the one the answer names.
#[tokio::test]
async fn a_request_whose_body_was_not_read_is_priced_as_the_model_the_answer_names() {
    let dir = scratch_dir("spend-unread");
    let upstream = MockUpstream::start().await;
    std::fs::write(dir.join("only.keys"), "sk-only\n").unwrap();
    let file = dir.join("upstreams.toml");
    std::fs::write(
        &file,
        format!(
            "default = \"only\"\n\n\
             [prices]\n\"gpt-4o\" = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}\n\n\
             [upstreams.only]\nbase_url = \"{}/v1\"\nkeys_file = {:?}\nmodels = [\"*\"]\n",
            upstream.base_url(),
            dir.join("only.keys")
        ),
    )
    .unwrap();
    let mut proxy = Proxy::new()
        .envs(&[
            ("UPSTREAMS_FILE", file.to_str().unwrap()),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("AUTH_VALIDATION", "true"),
            ("ALLOWED_TOKENS", CLIENT_TOKEN),
            ("STATE_DIR", dir.join("state").to_str().unwrap()),
        ])
        .owning(upstream)
        .in_dir(&dir)
        .start_binary()
        .await;
    let base = proxy.url("");
    call(
        &base,
        CLIENT_TOKEN,
        "/v1/chat/completions",
        chat("gpt-4o"),
        json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
               "prompt_tokens_details": {"cached_tokens": 400}}),
    )
    .await;
    assert_eq!(next_cost(&mut proxy).await, "0.004000");
    let by_model = spend_by(&base, "model").await;
    assert_eq!(by_model, [("gpt-4o".to_string(), 4_000_000, 4_000_000, 1)]);
    let by_upstream = spend_by(&base, "upstream").await;
    assert_eq!(by_upstream, [("only".to_string(), 4_000_000, 4_000_000, 1)]);
}

#[tokio::test]
async fn the_ledger_survives_a_restart_with_state_dir() {
    let fleet = fleet("spend-restart").await;
    let mut proxy = fleet.proxy().start_binary().await;
    let base = proxy.url("");
    run_the_worked_cases(&base, &mut proxy).await;
    proxy.terminate();
    assert!(
        proxy
            .log_line_with(&["stopped"], Duration::from_secs(10))
            .await
            .is_some()
    );
    let again = fleet.proxy().start_binary().await;
    let base = again.url("");
    assert_eq!(
        spend_by(&base, "client").await,
        [
            ("alice".to_string(), 14_460_000, 14_460_000, 3),
            ("bob".to_string(), 4_846_900, 4_846_900, 3),
        ]
    );
    assert_eq!(
        spend_by(&base, "upstream").await,
        [
            ("openai".to_string(), 15_456_900, 15_456_900, 5),
            ("azure".to_string(), 3_850_000, 3_850_000, 1),
        ]
    );
}

/// Polls `/admin/spend` grouped `by` until it answers `wanted`, for up to five seconds: the
/// replicas send their spend to Redis in the background.
async fn spend_becomes(base: &str, by: &str, wanted: &[(String, u64, u64, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = spend_by(base, by).await;
        if seen == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "{seen:?} is not {wanted:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn two_replicas_with_redis_see_each_others_spend() {
    let redis = RedisServer::start();
    let fleet = fleet("spend-redis").await;
    let url = redis.url();
    let mut a = fleet.proxy().env("REDIS_URL", &url).start_binary().await;
    let mut b = fleet.proxy().env("REDIS_URL", &url).start_binary().await;
    let (base_a, base_b) = (a.url(""), b.url(""));
    // $0.004 on a, $0.00385 on b.
    call(
        &base_a,
        "tok-alice",
        "/v1/chat/completions",
        chat("gpt-4o"),
        json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
               "prompt_tokens_details": {"cached_tokens": 400}}),
    )
    .await;
    assert_eq!(next_cost(&mut a).await, "0.004000");
    call(
        &base_b,
        "tok-bob",
        "/v1/chat/completions",
        chat("gpt-4o-eu"),
        json!({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}),
    )
    .await;
    assert_eq!(next_cost(&mut b).await, "0.003850");
    let by_client = [
        ("alice".to_string(), 4_000_000, 4_000_000, 1),
        ("bob".to_string(), 3_850_000, 3_850_000, 1),
    ];
    spend_becomes(&base_a, "client", &by_client).await;
    spend_becomes(&base_b, "client", &by_client).await;
    spend_becomes(
        &base_b,
        "upstream",
        &[
            ("openai".to_string(), 4_000_000, 4_000_000, 1),
            ("azure".to_string(), 3_850_000, 3_850_000, 1),
        ],
    )
    .await;
    // Every key of the ledger expires.
    let keys = redis.command(&["KEYS", "llm-proxy:{spend}:*"]);
    // RESP: the key names are the lines that are not lengths.
    let keys: Vec<&str> = keys
        .lines()
        .filter(|line| line.starts_with("llm-proxy:"))
        .collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    for key in keys {
        let ttl = redis.command(&["PTTL", key]);
        let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
        assert!(ttl > 0, "{key}: {ttl}");
    }
}

#[tokio::test]
async fn the_json_access_line_has_the_cost_as_a_number_or_null() {
    let fleet = fleet("spend-json").await;
    let mut proxy = fleet.proxy().env("LOG_FORMAT", "json").start_binary().await;
    let base = proxy.url("");
    let mut access_line = async |model: &str| -> Value {
        call(
            &base,
            "tok-alice",
            "/v1/chat/completions",
            chat(model),
            json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                   "prompt_tokens_details": {"cached_tokens": 400}}),
        )
        .await;
        let line = proxy
            .log_line_with(
                &["\"target\":\"access\"", "/v1/chat"],
                Duration::from_secs(5),
            )
            .await
            .expect("an access line");
        serde_json::from_str(&line).unwrap()
    };
    let priced = access_line("gpt-4o").await;
    assert_eq!(priced["cost_usd"], json!(0.004), "{priced}");
    let unpriced = access_line("free-1").await;
    assert_eq!(unpriced["cost_usd"], Value::Null, "{unpriced}");
    assert_eq!(unpriced["model"], "free-1");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn spend_made_while_redis_is_down_reaches_it_once_it_answers() {
    let mut redis = RedisServer::start();
    let fleet = fleet("spend-outage").await;
    let url = redis.url();
    let mut a = fleet.proxy().env("REDIS_URL", &url).start_binary().await;
    let b = fleet.proxy().env("REDIS_URL", &url).start_binary().await;
    let (base_a, base_b) = (a.url(""), b.url(""));
    redis.stop();
    call(
        &base_a,
        "tok-alice",
        "/v1/chat/completions",
        chat("gpt-4o"),
        json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
               "prompt_tokens_details": {"cached_tokens": 400}}),
    )
    .await;
    assert_eq!(next_cost(&mut a).await, "0.004000");
    // Without Redis, each replica answers with its own spend.
    let alone = [("alice".to_string(), 4_000_000, 4_000_000, 1)];
    spend_becomes(&base_a, "client", &alone).await;
    spend_becomes(&base_b, "client", &[]).await;
    // Back (empty): the batch that waited arrives, and both replicas read it there.
    redis.restart();
    spend_becomes(&base_b, "client", &alone).await;
    spend_becomes(&base_a, "client", &alone).await;
}
