//! Several upstreams from an upstreams file (`UPSTREAMS_FILE`): routing by model, failover that
//! stops once the answer has started, breakers, the merged model list, reloading the file, and
//! what operators see of it. Every upstream is a mock (or a closed port, or a raw socket) on
//! 127.0.0.1 with keys of its own, so a test can tell which one a request reached.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use mock_upstream::{MockOptions, MockUpstream, RecordedRequest};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::clients::{chat_body, scratch_dir};
use crate::helpers::*;
use crate::redis_server::RedisServer;
use llm_proxy::shared::signals::CHANNEL;

const CHAT_PATH: &str = "/v1/chat/completions";

/// Key number `position` (from 1) of upstream `name`: every upstream has its own.
fn key(name: &str, position: usize) -> String {
    format!("sk-{name}-{position}")
}

/// Where an upstream of the file points.
enum Target {
    /// A fresh mock serving as the options say.
    Mock(MockOptions),
    /// A base URL the test provides (a closed port, a raw upstream).
    At(String),
}

struct Spec {
    name: String,
    target: Target,
    keys: usize,
    /// The table's lines besides `base_url` and `keys_file`.
    fields: String,
}

/// An upstreams file to write, the mocks behind it, and the proxy's other settings.
struct Fleet {
    top: String,
    specs: Vec<Spec>,
    tail: String,
    extra: Vec<(String, String)>,
}

/// The mocks of a started [`Fleet`], by upstream name, and where its file is.
struct Mocks {
    mocks: Vec<(String, MockUpstream)>,
    dir: PathBuf,
    file: PathBuf,
    /// The file as written.
    text: String,
    /// The proxy's settings besides the file.
    extra: Vec<(String, String)>,
}

impl Fleet {
    /// `top`: the file's top-level fields (`default`, `max_attempts`...).
    fn new(top: &str) -> Fleet {
        Fleet {
            top: top.to_string(),
            specs: Vec::new(),
            tail: String::new(),
            extra: Vec::new(),
        }
    }

    /// Upstream `name`: a plain mock with one key.
    fn mock(self, name: &str, fields: &str) -> Fleet {
        self.mock_with(name, MockOptions::default(), 1, fields)
    }

    fn mock_with(mut self, name: &str, options: MockOptions, keys: usize, fields: &str) -> Fleet {
        self.specs.push(Spec {
            name: name.to_string(),
            target: Target::Mock(options),
            keys,
            fields: fields.to_string(),
        });
        self
    }

    /// Upstream `name` at `base_url`, with one key.
    fn at(mut self, name: &str, base_url: &str, fields: &str) -> Fleet {
        self.specs.push(Spec {
            name: name.to_string(),
            target: Target::At(base_url.to_string()),
            keys: 1,
            fields: fields.to_string(),
        });
        self
    }

    /// Text after the upstream tables (`[aliases]`).
    fn tail(mut self, tail: &str) -> Fleet {
        self.tail = tail.to_string();
        self
    }

    fn env(mut self, name: &str, value: &str) -> Fleet {
        self.extra.push((name.to_string(), value.to_string()));
        self
    }

    /// Starts the mocks and writes the keys files and the upstreams file.
    async fn prepare(self) -> (Proxy, Mocks) {
        let dir = scratch_dir("routing");
        let mut text = format!("{}\n", self.top);
        let mut mocks = Vec::new();
        for spec in self.specs {
            let base_url = match spec.target {
                Target::Mock(options) => {
                    let mock = MockUpstream::start_with(options).await;
                    let base_url = format!("{}/v1", mock.base_url());
                    mocks.push((spec.name.clone(), mock));
                    base_url
                }
                Target::At(base_url) => base_url,
            };
            text.push_str(&table(&dir, &spec.name, &base_url, spec.keys, &spec.fields));
        }
        text.push_str(&self.tail);
        let file = dir.join("upstreams.toml");
        std::fs::write(&file, &text).unwrap();
        let mocks = Mocks {
            mocks,
            dir,
            file,
            text,
            extra: self.extra,
        };
        (mocks.proxy(), mocks)
    }

    /// The proxy in this process.
    async fn start(self) -> (TestApp, Mocks) {
        let (proxy, mocks) = self.prepare().await;
        (proxy.start_in_process().await, mocks)
    }
}

/// One `[upstreams.<name>]` table, its `keys` keys written to a keys file next to the file.
fn table(dir: &std::path::Path, name: &str, base_url: &str, keys: usize, fields: &str) -> String {
    let keys_file = dir.join(format!("{name}.keys"));
    let lines: Vec<String> = (1..=keys).map(|position| key(name, position)).collect();
    std::fs::write(&keys_file, lines.join("\n") + "\n").unwrap();
    format!(
        "\n[upstreams.{name}]\nbase_url = \"{base_url}\"\nkeys_file = \"{}\"\n{fields}\n",
        keys_file.to_str().unwrap()
    )
}

impl Mocks {
    /// A proxy on this file with the fleet's settings: one more replica of the same set.
    fn proxy(&self) -> Proxy {
        let proxy = Proxy::new()
            .env("AUTH_VALIDATION", "true")
            .env("ALLOWED_TOKENS", CLIENT_TOKEN)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("UPSTREAMS_FILE", self.file.to_str().unwrap());
        self.extra.iter().fold(proxy, |proxy, (name, value)| {
            proxy.env(name, value.as_str())
        })
    }

    fn get(&self, name: &str) -> &MockUpstream {
        self.mocks
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, mock)| mock)
            .unwrap_or_else(|| panic!("no mock named {name}"))
    }

    fn remove(&mut self, name: &str) -> MockUpstream {
        let index = self
            .mocks
            .iter()
            .position(|(known, _)| known == name)
            .unwrap_or_else(|| panic!("no mock named {name}"));
        self.mocks.remove(index).1
    }

    /// The chat requests upstream `name` received.
    fn chats(&self, name: &str) -> Vec<RecordedRequest> {
        chats(self.get(name))
    }

    /// How many chat requests each upstream received, in the order of the file.
    fn chat_counts(&self) -> Vec<(String, usize)> {
        self.mocks
            .iter()
            .map(|(name, mock)| (name.clone(), chats(mock).len()))
            .collect()
    }
}

fn chats(mock: &MockUpstream) -> Vec<RecordedRequest> {
    mock.requests()
        .into_iter()
        .filter(|request| request.path == CHAT_PATH)
        .collect()
}

/// Every request `mock` received except the model list (which a proxy may fetch whenever it
/// likes): what a client's request could have caused.
fn sent_to(mock: &MockUpstream) -> Vec<RecordedRequest> {
    mock.requests()
        .into_iter()
        .filter(|request| !(request.method == "GET" && request.path == "/v1/models"))
        .collect()
}

/// A base URL where nothing listens: connecting is refused.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

/// The value of series `name` with exactly `labels` (in any order) in a `/metrics` text.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels
        .iter()
        .map(|(label, value)| format!("{label}=\"{value}\""))
        .collect();
    wanted.sort();
    text.lines().find_map(|line| {
        let (found, value) = line.rsplit_once(' ')?;
        let (found_name, found_labels) = match found.split_once('{') {
            Some((found_name, rest)) => (found_name, rest.strip_suffix('}')?),
            None => (found, ""),
        };
        if found_name != name {
            return None;
        }
        let mut found_labels: Vec<String> = found_labels
            .split(',')
            .filter(|label| !label.is_empty())
            .map(str::to_string)
            .collect();
        found_labels.sort();
        if found_labels != wanted {
            return None;
        }
        value.parse().ok()
    })
}

/// `/metrics` at `base` (the proxy's address) read with the admin token.
async fn metrics_at(base: &str) -> String {
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

/// Reads series `name{labels}` until it is `value` (5 s at most); its last reading.
async fn series_becomes(
    base: &str,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
) -> Option<f64> {
    let reached = eventually(Duration::from_secs(5), async || {
        series(&metrics_at(base).await, name, labels) == Some(value)
    })
    .await;
    if reached {
        Some(value)
    } else {
        series(&metrics_at(base).await, name, labels)
    }
}

fn base(app: &TestApp) -> String {
    app.url("")
}

/// The entry of upstream `name` in `/admin/upstreams`.
async fn admin_entry(app: &TestApp, name: &str) -> Value {
    let listed: Value = app
        .admin_get("/admin/upstreams")
        .await
        .json()
        .await
        .unwrap();
    listed["upstreams"]
        .as_array()
        .unwrap_or_else(|| panic!("no upstreams array: {listed}"))
        .iter()
        .find(|upstream| upstream["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {listed}"))
        .clone()
}

async fn breaker_state(app: &TestApp, name: &str) -> Value {
    admin_entry(app, name).await["breaker"]["state"].clone()
}

async fn chat(app: &TestApp, model: &str) -> reqwest::Response {
    app.chat(CLIENT_TOKEN, chat_body(model)).await
}

/// The body the mock answers for a key given a fixed status.
fn key_answer_body(status: u16) -> String {
    format!(
        "{{\"error\":{{\"message\":\"mock upstream answer for this key: {status}\",\"type\":\"requests\",\"param\":null,\"code\":null}}}}"
    )
}

// ----- routing -----------------------------------------------------------

#[tokio::test]
async fn exact_names_wildcards_and_aliases_route_and_only_the_model_string_is_renamed() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", r#"models = ["gpt-4o"]"#)
        .mock("b", r#"models = ["o3*"]"#)
        .mock(
            "l",
            r#"models = ["llama-3.1-70b"]
model_names = { "llama-3.1-70b" = "meta-llama/Llama-3.1-70B-Instruct" }"#,
        )
        .tail("\n[aliases]\n\"gpt-4\" = \"gpt-4o\"\n\"fast\" = \"llama-3.1-70b\"\n")
        .start()
        .await;
    // Odd spacing, escapes, non-ASCII, the model's name elsewhere in the text and a nested
    // "model" key: none of it may change.
    let template = r#"{ "messages" : [{"role":"user","content":"say \"model\": \"gpt-4o\" \u00e9 é"}],"model":  "{MODEL}" ,"temperature":0.5,"metadata":{"model":"inner"}}"#;
    let llama = "meta-llama/Llama-3.1-70B-Instruct";
    let cases = [
        ("gpt-4o", "a", "gpt-4o"),
        ("o3-mini", "b", "o3-mini"),
        ("o3", "b", "o3"),
        ("gpt-4", "a", "gpt-4o"),
        ("llama-3.1-70b", "l", llama),
        ("fast", "l", llama),
    ];
    for (asked, upstream, renamed) in cases {
        let before = mocks.chat_counts();
        let sent = template.replace("{MODEL}", asked);
        let response = app
            .chat_request()
            .header("content-type", "application/json")
            .body(sent)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asked}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer["model"], renamed,
            "the answer comes back as the upstream gave it"
        );

        let after = mocks.chat_counts();
        for ((name, was), (_, is)) in before.iter().zip(&after) {
            let expected = was + usize::from(name == upstream);
            assert_eq!(*is, expected, "{asked}: requests of {name}");
        }
        let received = mocks.chats(upstream).pop().unwrap();
        assert_eq!(
            received.body,
            template.replace("{MODEL}", renamed).as_bytes(),
            "{asked}: every byte but the model's name"
        );
        assert_eq!(received.key(), Some(key(upstream, 1).as_str()));
    }
}

#[tokio::test]
async fn requests_without_a_model_go_to_the_default_upstream() {
    let (app, mocks) = Fleet::new("default = \"b\"\nmax_attempts = 3")
        .mock("a", r#"models = ["gpt-4o", "*"]"#)
        .mock("b", r#"models = ["o3*"]"#)
        .start()
        .await;
    let files = app
        .authorised(reqwest::Method::GET, "/v1/files")
        .send()
        .await
        .unwrap();
    assert_eq!(files.status(), 200);
    let batch =
        json!({"input_file_id": "file-1", "endpoint": CHAT_PATH, "completion_window": "24h"});
    let batches = app
        .authorised(reqwest::Method::POST, "/v1/batches")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(batches.status(), 200);

    let seen: Vec<(String, String)> = sent_to(mocks.get("b"))
        .into_iter()
        .map(|request| (request.method, request.path))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET".to_string(), "/v1/files".to_string()),
            ("POST".to_string(), "/v1/batches".to_string())
        ]
    );
    assert_eq!(
        sent_to(mocks.get("b"))[1].body,
        batch.to_string().as_bytes()
    );
    assert!(
        sent_to(mocks.get("a")).is_empty(),
        "a matches every model but is not the default"
    );
}

#[tokio::test]
async fn an_unknown_model_is_a_404_model_not_found_and_nothing_is_sent() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", r#"models = ["gpt-4o", "o3*"]"#)
        .mock("b", r#"models = ["deepseek-chat"]"#)
        .tail("\n[aliases]\n\"gpt-4\" = \"gpt-4o\"\n")
        .start()
        .await;
    for model in ["gpt-5", "o4-mini", "gpt-4o-mini", "deepseek"] {
        let response = chat(&app, model).await;
        assert_eq!(response.status(), 404, "{model}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body.as_object().unwrap().len(),
            3,
            "error, message and time: {body}"
        );
        assert_eq!(body["error"], "model_not_found", "{body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
        assert_rfc3339(body["time"].as_str().unwrap());
    }
    assert!(sent_to(mocks.get("a")).is_empty());
    assert!(sent_to(mocks.get("b")).is_empty());
}

#[tokio::test]
async fn weights_three_to_one_serve_exactly_300_and_100_of_400_requests_interleaved() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\nweight = 3")
        .mock("b", "models = [\"m\"]\nweight = 1")
        .start()
        .await;
    let mut order = Vec::new();
    for _ in 0..400 {
        let before = mocks.chats("a").len();
        assert_eq!(chat(&app, "m").await.status(), 200);
        order.push(if mocks.chats("a").len() > before {
            'a'
        } else {
            'b'
        });
    }
    assert_eq!(mocks.chats("a").len(), 300);
    assert_eq!(mocks.chats("b").len(), 100);
    // "3 of every 4": each run of four requests, not just the total.
    for (index, four) in order.chunks(4).enumerate() {
        let to_a = four.iter().filter(|picked| **picked == 'a').count();
        assert_eq!(
            to_a,
            3,
            "requests {}..{}: {four:?}",
            index * 4,
            index * 4 + 4
        );
    }
}

#[tokio::test]
async fn a_lower_tier_serves_only_when_the_tier_above_cannot() {
    let (app, mut mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    for _ in 0..20 {
        assert_eq!(chat(&app, "m").await.status(), 200);
    }
    assert_eq!(mocks.chats("a").len(), 20);
    assert!(mocks.chats("b").is_empty(), "tier 1 while tier 0 serves");

    // Tier 0 goes away: its port refuses connections.
    mocks.remove("a").shutdown().await;
    for _ in 0..10 {
        assert_eq!(chat(&app, "m").await.status(), 200);
    }
    assert_eq!(mocks.chats("b").len(), 10);
}

// ----- failover ----------------------------------------------------------

#[tokio::test]
async fn a_refused_connection_fails_over_and_the_access_line_and_metrics_say_so() {
    let dead = closed_port().await;
    let (proxy, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .at("a", &dead, "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .prepare()
        .await;
    let mut proxy = proxy.start_binary().await;
    let response = reqwest::Client::new()
        .post(proxy.url(CHAT_PATH))
        .bearer_auth(CLIENT_TOKEN)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["object"],
        "chat.completion"
    );
    assert_eq!(mocks.chats("b").len(), 1);

    let line = proxy
        .log_line_with(
            &[
                "POST /v1/chat/completions",
                "status=200",
                "upstream=b",
                "attempts=2",
                "failover=",
            ],
            Duration::from_secs(5),
        )
        .await;
    let line = line.expect("an access line naming the upstream, the attempts and the failover");
    let (_, reasons) = line.split_once("failover=").unwrap();
    assert!(
        reasons.starts_with("connect") || reasons.starts_with("a:connect"),
        "{line}"
    );

    let base = proxy.url("");
    let base = base.trim_end_matches('/');
    assert_eq!(
        series_becomes(
            base,
            "llm_proxy_failovers_total",
            &[("upstream", "a"), ("reason", "connect")],
            1.0
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        series_becomes(
            base,
            "llm_proxy_upstream_requests_total",
            &[("upstream", "a"), ("class", "connect")],
            1.0
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        series_becomes(
            base,
            "llm_proxy_upstream_requests_total",
            &[("upstream", "b"), ("class", "2xx")],
            1.0
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_503_fails_over_to_the_next_upstream() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    mocks.get("a").answer_key(&key("a", 1), 503, &[]);
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["object"],
        "chat.completion"
    );
    assert_eq!(mocks.chats("a").len(), 1);
    assert_eq!(mocks.chats("b").len(), 1);
    assert_eq!(
        mocks.chats("a")[0].body,
        mocks.chats("b")[0].body,
        "the same body goes to the next upstream"
    );
    let labels = [("upstream", "a"), ("reason", "status_503")];
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_failovers_total", &labels, 1.0).await,
        Some(1.0)
    );
    let labels = [("upstream", "a"), ("class", "5xx")];
    assert_eq!(
        series_becomes(
            &base(&app),
            "llm_proxy_upstream_requests_total",
            &labels,
            1.0
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_body_sent_in_several_chunks_reaches_each_upstream_whole_and_renamed_only_in_its_model() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock(
            "b",
            "models = [\"m\"]\ntier = 1\nmodel_names = { \"m\" = \"theirs/m\" }",
        )
        .start()
        .await;
    mocks.get("a").answer_key(&key("a", 1), 503, &[]);
    let sent = r#"{"messages":[{"role":"user","content":"caf\u00e9 é 日本"}],"model":"m","n":1}"#;
    // Cut inside the model's value and inside a multi-byte character, each piece a moment
    // after the last, so that the proxy reads them as separate chunks.
    let bytes = sent.as_bytes().to_vec();
    let model_at = sent.find(r#""m""#).unwrap();
    let cuts = [
        0,
        5,
        model_at + 1,
        bytes.len() - 4,
        bytes.len() - 3,
        bytes.len(),
    ];
    let pieces: Vec<Vec<u8>> = cuts
        .windows(2)
        .map(|cut| bytes[cut[0]..cut[1]].to_vec())
        .collect();
    let pieces = futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, std::io::Error>(piece)
    });
    let response = app
        .chat_request()
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (to_a, to_b) = (mocks.chats("a"), mocks.chats("b"));
    assert_eq!((to_a.len(), to_b.len()), (1, 1), "a failed, b answered");
    assert_eq!(
        to_a[0].body,
        sent.as_bytes(),
        "a got the body as it was sent"
    );
    assert_eq!(
        to_b[0].body,
        sent.replace(r#""model":"m""#, r#""model":"theirs/m""#)
            .as_bytes(),
        "b got the same bytes, its own name for the model aside"
    );
    for received in [&to_a[0], &to_b[0]] {
        assert_eq!(received.header("content-type"), Some("application/json"));
        assert_eq!(
            received.header("content-length"),
            Some(received.body.len().to_string().as_str())
        );
    }
}

#[tokio::test]
async fn no_head_within_the_upstreams_timeout_fails_over() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0\ntimeout_secs = 1")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    mocks.get("a").delay_heads(Duration::from_secs(5));
    let started = Instant::now();
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 200);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "a had its second: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(mocks.get("a").requests_started(), 1);
    assert_eq!(mocks.chats("b").len(), 1);
    let labels = [("upstream", "a"), ("reason", "timeout")];
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_failovers_total", &labels, 1.0).await,
        Some(1.0)
    );
    let labels = [("upstream", "a"), ("class", "timeout")];
    assert_eq!(
        series_becomes(
            &base(&app),
            "llm_proxy_upstream_requests_total",
            &labels,
            1.0
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_429_fails_over_once_every_key_of_the_upstream_rests() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock_with("a", MockOptions::default(), 2, "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    for position in [1, 2] {
        mocks
            .get("a")
            .answer_key(&key("a", position), 429, &[("retry-after", "60")]);
    }
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 200);
    let mut keys: Vec<String> = mocks
        .chats("a")
        .iter()
        .map(|request| request.key().unwrap().to_string())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [key("a", 1), key("a", 2)],
        "a's pool is used up first"
    );
    assert_eq!(mocks.chats("b").len(), 1);
    let labels = [("upstream", "a"), ("reason", "status_429")];
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_failovers_total", &labels, 1.0).await,
        Some(1.0)
    );

    // Both of a's keys rest for a minute: the next request goes to b without asking a.
    assert_eq!(chat(&app, "m").await.status(), 200);
    assert_eq!(mocks.chats("a").len(), 2);
    assert_eq!(mocks.chats("b").len(), 2);
}

#[tokio::test]
async fn a_429_with_keys_of_the_pool_still_usable_never_counts_against_the_breaker() {
    // Two attempts a request: ten of a's eleven keys at their limits use them up two by two.
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 2")
        .mock_with(
            "a",
            MockOptions::default(),
            11,
            "models = [\"m\"]\ntier = 0",
        )
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    for position in 1..=10 {
        mocks
            .get("a")
            .answer_key(&key("a", position), 429, &[("retry-after", "60")]);
    }
    for request in 1..=5 {
        let response = chat(&app, "m").await;
        assert_eq!(
            response.status(),
            429,
            "request {request}: the answer as it came"
        );
        assert_eq!(response.text().await.unwrap(), key_answer_body(429));
    }
    assert_eq!(mocks.chats("a").len(), 10);
    assert!(
        sent_to(mocks.get("b")).is_empty(),
        "no attempt was left for b"
    );
    let entry = admin_entry(&app, "a").await;
    assert_eq!(
        entry["breaker"],
        json!({"state": "closed", "closes_at": null}),
        "a's eleventh key was usable all along: {entry}"
    );
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        mocks.chats("a")[10].key(),
        Some(key("a", 11).as_str()),
        "a serves with its eleventh key"
    );
    assert!(sent_to(mocks.get("b")).is_empty());
}

#[tokio::test]
async fn a_400_404_or_422_is_the_answer_and_never_fails_over() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    for status in [400u16, 404, 422] {
        mocks
            .get("a")
            .answer_key(&key("a", 1), status, &[("x-from", "a")]);
        let response = chat(&app, "m").await;
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(response.headers()["x-from"], "a");
        assert_eq!(response.text().await.unwrap(), key_answer_body(status));
    }
    assert_eq!(mocks.chats("a").len(), 3);
    assert!(sent_to(mocks.get("b")).is_empty(), "b saw nothing");
    let text = app.metrics_text().await;
    assert!(
        !text
            .lines()
            .any(|line| line.starts_with("llm_proxy_failovers_total{") && !line.ends_with(" 0")),
        "{text}"
    );
}

#[tokio::test]
async fn a_stream_cut_after_two_chunks_ends_with_the_error_event_and_goes_nowhere_else() {
    const FIRST: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n";
    const SECOND: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"two\"}}]}\n\n";
    let (cutting, heads) = spawn_raw_upstream(|mut socket| async move {
        let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for event in [FIRST, SECOND] {
            reply.extend(format!("{:x}\r\n{event}\r\n", event.len()).into_bytes());
        }
        socket.write_all(&reply).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The connection closes without the last chunk: the answer is incomplete.
    })
    .await;
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .at("a", &format!("{cutting}/v1"), "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    let response = app
        .chat_request()
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (received, truncated) = read_stream(response).await;
    assert!(
        received.starts_with(&format!("{FIRST}{SECOND}")),
        "{received}"
    );
    assert!(
        received[FIRST.len() + SECOND.len()..]
            .starts_with("data: {\"error\":{\"code\":\"upstream_stream_interrupted\""),
        "{received}"
    );
    assert!(!received.contains("[DONE]"), "{received}");
    assert!(truncated, "the transfer must not end cleanly");
    assert_eq!(heads.lock().unwrap().len(), 1);
    assert!(sent_to(mocks.get("b")).is_empty(), "b saw nothing");
}

#[tokio::test]
async fn max_attempts_three_across_five_failing_upstreams_makes_three_attempts() {
    let mut fleet = Fleet::new("default = \"u0\"\nmax_attempts = 3");
    for tier in 0..5 {
        fleet = fleet.mock(
            &format!("u{tier}"),
            &format!("models = [\"m\"]\ntier = {tier}"),
        );
    }
    let (app, mocks) = fleet.start().await;
    for tier in 0..5 {
        let name = format!("u{tier}");
        mocks
            .get(&name)
            .answer_key(&key(&name, 1), 503, &[("x-upstream", name.as_str())]);
    }
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-upstream"],
        "u2",
        "the last answer, as it came"
    );
    assert_eq!(response.text().await.unwrap(), key_answer_body(503));
    let counts: Vec<usize> = mocks
        .chat_counts()
        .into_iter()
        .map(|(_, count)| count)
        .collect();
    assert_eq!(counts, [1, 1, 1, 0, 0]);
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_upstream_attempts_sum", &[], 3.0).await,
        Some(3.0)
    );
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_upstream_attempts_count", &[], 1.0).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn the_request_deadline_bounds_two_hanging_upstreams_and_a_cut_attempt_is_no_failure() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3\nrequest_timeout_secs = 2")
        .mock("a", "models = [\"m\"]\ntier = 0\ntimeout_secs = 1")
        .mock("b", "models = [\"m\"]\ntier = 1\ntimeout_secs = 10")
        .start()
        .await;
    // a hangs past its second; b works but needs three seconds for its head, more than the
    // deadline leaves it after a.
    mocks.get("a").delay_heads(Duration::from_secs(10));
    mocks.get("b").delay_heads(Duration::from_secs(3));
    let timed = futures::future::join_all((0..5).map(|_| async {
        let started = Instant::now();
        let response = chat(&app, "m").await;
        (started.elapsed(), response)
    }))
    .await;
    for (took, response) in timed {
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(
            took < Duration::from_secs(3),
            "two seconds in all: {took:?}"
        );
        assert_eq!(response.status(), 504);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "gateway_timeout", "{body}");
    }
    assert_eq!(mocks.get("a").requests_started(), 5);
    assert_eq!(mocks.get("b").requests_started(), 5);

    // a let five heads wait past its own timeout: open. b was never given its ten seconds: the
    // deadline cut it short, which is no failure of b's.
    assert_eq!(breaker_state(&app, "a").await, "open");
    let entry = admin_entry(&app, "b").await;
    assert_eq!(
        entry["breaker"],
        json!({"state": "closed", "closes_at": null}),
        "{entry}"
    );
    assert_eq!(entry["last_failure"], Value::Null, "{entry}");
    mocks.get("b").delay_heads(Duration::ZERO);
    assert_eq!(chat(&app, "m").await.status(), 200);
    assert_eq!(
        mocks.get("a").requests_started(),
        5,
        "a is open and skipped"
    );
}

#[tokio::test]
async fn max_attempts_counts_the_keys_of_a_pool_and_the_upstreams_together() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock_with("a", MockOptions::default(), 2, "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .mock("c", "models = [\"m\"]\ntier = 2")
        .start()
        .await;
    for position in [1, 2] {
        mocks
            .get("a")
            .answer_key(&key("a", position), 429, &[("retry-after", "60")]);
    }
    mocks
        .get("b")
        .answer_key(&key("b", 1), 503, &[("x-from", "b")]);
    let response = chat(&app, "m").await;
    assert_eq!(response.status(), 503, "b's answer: c was never asked");
    assert_eq!(response.headers()["x-from"], "b");
    assert_eq!(mocks.chats("a").len(), 2, "both of a's keys");
    assert_eq!(mocks.chats("b").len(), 1);
    assert!(sent_to(mocks.get("c")).is_empty(), "three attempts in all");
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_upstream_attempts_sum", &[], 3.0).await,
        Some(3.0)
    );
}

// ----- health ------------------------------------------------------------

#[tokio::test]
async fn a_breaker_opens_after_five_failures_is_skipped_then_one_probe_closes_it() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    let a = mocks.get("a");
    a.answer_key(&key("a", 1), 503, &[]);
    for _ in 0..5 {
        assert_eq!(chat(&app, "m").await.status(), 200, "b answers each time");
    }
    assert_eq!(mocks.chats("a").len(), 5);
    let state = [("upstream", "a")];
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_upstream_breaker_state", &state, 2.0).await,
        Some(2.0)
    );
    let entry = admin_entry(&app, "a").await;
    assert_eq!(entry["breaker"]["state"], "open", "{entry}");
    assert_eq!(entry["last_failure"], "status_503", "{entry}");
    let closes_at = entry["breaker"]["closes_at"].as_str().unwrap().to_string();
    let closes_at = humantime::parse_rfc3339(&closes_at).unwrap();
    let cool_down = closes_at.duration_since(SystemTime::now()).unwrap();
    assert!(
        cool_down > Duration::from_secs(8) && cool_down <= Duration::from_secs(11),
        "open for 10 s: {cool_down:?}"
    );
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "b is still there");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["upstreams"], json!({"a": "open", "b": "closed"}));

    // Open: a is not asked at all.
    for _ in 0..3 {
        assert_eq!(chat(&app, "m").await.status(), 200);
    }
    assert_eq!(mocks.chats("a").len(), 5);
    assert_eq!(mocks.chats("b").len(), 8);

    // After the cool-down a answers again, slowly: of three requests at once, one is the probe.
    a.forget_key(&key("a", 1));
    a.delay_heads(Duration::from_millis(600));
    let wait = closes_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    // A second more: the time shown may be cut to whole seconds.
    tokio::time::sleep(wait + Duration::from_millis(1100)).await;
    let three = futures::future::join_all((0..3).map(|_| chat(&app, "m"))).await;
    assert!(three.iter().all(|response| response.status() == 200));
    assert_eq!(mocks.chats("a").len(), 6, "one probe");
    assert_eq!(mocks.chats("b").len(), 10);
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_upstream_breaker_state", &state, 0.0).await,
        Some(0.0)
    );
    let entry = admin_entry(&app, "a").await;
    assert_eq!(
        entry["breaker"],
        json!({"state": "closed", "closes_at": null})
    );

    // Closed: tier 0 serves again.
    a.delay_heads(Duration::ZERO);
    assert_eq!(chat(&app, "m").await.status(), 200);
    assert_eq!(mocks.chats("a").len(), 7);
    assert_eq!(mocks.chats("b").len(), 10);
}

#[tokio::test]
async fn when_every_candidate_is_open_the_request_is_still_sent_and_counted_as_panic() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"solo\"]")
        .mock("b", "models = [\"other\"]")
        .start()
        .await;
    let a = mocks.get("a");
    a.answer_key(&key("a", 1), 503, &[]);
    for _ in 0..5 {
        assert_eq!(chat(&app, "solo").await.status(), 503);
    }
    assert_eq!(mocks.chats("a").len(), 5);
    assert_eq!(breaker_state(&app, "a").await, "open");

    a.forget_key(&key("a", 1));
    let response = chat(&app, "solo").await;
    assert_eq!(
        response.status(),
        200,
        "sent to a although its breaker is open"
    );
    assert_eq!(mocks.chats("a").len(), 6);
    assert!(sent_to(mocks.get("b")).is_empty());
    let labels = [("model", "solo")];
    assert_eq!(
        series_becomes(&base(&app), "llm_proxy_panic_routing_total", &labels, 1.0).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn clients_hanging_up_never_open_a_breaker() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0\ntimeout_secs = 30")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .start()
        .await;
    let a = mocks.get("a");
    for hung_up in 1..=5 {
        let gave_up = app
            .chat_request()
            .header("x-mock-delay-ms", "3000")
            .timeout(Duration::from_millis(300))
            .json(&chat_body("m"))
            .send()
            .await;
        assert!(gave_up.unwrap_err().is_timeout());
        let abandoned = eventually(Duration::from_secs(5), async || {
            a.requests_abandoned() == hung_up
        })
        .await;
        assert!(abandoned, "the proxy let go of a's request {hung_up}");
    }
    assert!(
        sent_to(mocks.get("b")).is_empty(),
        "a client's hang-up is no failover"
    );
    let entry = admin_entry(&app, "a").await;
    assert_eq!(
        entry["breaker"],
        json!({"state": "closed", "closes_at": null})
    );
    assert_eq!(entry["last_failure"], Value::Null);
    let state = [("upstream", "a")];
    assert_eq!(
        series(
            &app.metrics_text().await,
            "llm_proxy_upstream_breaker_state",
            &state
        ),
        Some(0.0)
    );
    assert_eq!(chat(&app, "m").await.status(), 200);
    assert_eq!(mocks.chats("a").len(), 6);
    assert!(sent_to(mocks.get("b")).is_empty());
}

#[tokio::test]
async fn the_proxys_own_413_after_the_upstream_was_asked_never_counts_against_its_breaker() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .env("MAX_BODY_BYTES", "1000")
        .start()
        .await;
    // A streamed upload cut off past the cap: a has begun the request, and the fault is the
    // caller's. More than the five that would open a breaker.
    for upload in 1..=6 {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..10).map(|_| Ok(vec![b'x'; 500])).collect();
        let response = app
            .authorised(reqwest::Method::POST, "/v1/files")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "upload {upload}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "payload_too_large", "{body}");
    }
    assert_eq!(
        mocks.get("a").requests_started(),
        6,
        "a was asked each time"
    );
    assert_eq!(mocks.get("a").requests_answered(), 0);
    assert!(sent_to(mocks.get("b")).is_empty(), "no failover either");
    let entry = admin_entry(&app, "a").await;
    assert_eq!(
        entry["breaker"],
        json!({"state": "closed", "closes_at": null}),
        "{entry}"
    );
    assert_eq!(entry["last_failure"], Value::Null, "{entry}");
    assert_eq!(chat(&app, "m").await.status(), 200);
    assert_eq!(mocks.chats("a").len(), 1, "a still serves m");
    assert!(sent_to(mocks.get("b")).is_empty());
}

// ----- replicas (REDIS_URL) ---------------------------------------------

/// What the issue asks: an opening on one replica is honoured by another within this.
const WITHIN: Duration = Duration::from_millis(100);

/// The entry of upstream `name` in `/admin/upstreams` of the replica at `base`.
async fn admin_entry_at(base: &str, name: &str) -> Value {
    let listed: Value = reqwest::Client::new()
        .get(format!("{base}/admin/upstreams"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listed["upstreams"]
        .as_array()
        .unwrap_or_else(|| panic!("no upstreams array: {listed}"))
        .iter()
        .find(|upstream| upstream["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {listed}"))
        .clone()
}

/// How long until an open breaker's `closes_at` (an `/admin/upstreams` entry).
fn open_for(entry: &Value) -> Duration {
    let closes_at = entry["breaker"]["closes_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no closes_at: {entry}"));
    humantime::parse_rfc3339(closes_at)
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

fn replica_base(proxy: &RunningProxy) -> String {
    proxy.url("").trim_end_matches('/').to_string()
}

async fn chat_through(proxy: &RunningProxy, model: &str) -> u16 {
    let response = reqwest::Client::new()
        .post(proxy.url(CHAT_PATH))
        .bearer_auth(CLIENT_TOKEN)
        .json(&chat_body(model))
        .send()
        .await
        .expect("the replica answers");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_breaker_opened_on_one_replica_is_honoured_by_another_within_100_ms_and_by_a_new_one() {
    let redis = RedisServer::start();
    let (proxy, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", "models = [\"m\"]\ntier = 0")
        .mock("b", "models = [\"m\"]\ntier = 1")
        .env("REDIS_URL", &redis.url())
        .prepare()
        .await;
    let first = proxy.start_binary().await;
    let second = mocks.proxy().start_binary().await;
    let subscribed = eventually(Duration::from_secs(5), async || {
        redis
            .command(&["PUBSUB", "NUMSUB", CHANNEL])
            .ends_with(":2\r\n")
    })
    .await;
    assert!(subscribed, "both replicas listen");
    let (on_first, on_second) = (replica_base(&first), replica_base(&second));
    let state = [("upstream", "a")];
    let gauge = "llm_proxy_upstream_breaker_state";

    mocks.get("a").answer_key(&key("a", 1), 503, &[]);
    for _ in 0..4 {
        assert_eq!(chat_through(&first, "m").await, 200, "b answers each time");
    }
    assert_eq!(
        series(&metrics_at(&on_first).await, gauge, &state),
        Some(0.0)
    );
    assert_eq!(
        series(&metrics_at(&on_second).await, gauge, &state),
        Some(0.0)
    );
    // Taken before the fifth failure: this overstates the time since the opening.
    let started = Instant::now();
    assert_eq!(chat_through(&first, "m").await, 200);
    let heard = eventually(Duration::from_secs(5), async || {
        series(&metrics_at(&on_second).await, gauge, &state) == Some(2.0)
    })
    .await;
    let took = started.elapsed();
    assert!(heard, "the second replica sees a's breaker open");
    assert!(
        took < WITHIN,
        "the second replica saw it {took:?} after the request"
    );
    assert_eq!(
        series(&metrics_at(&on_first).await, gauge, &state),
        Some(2.0)
    );
    assert_eq!(mocks.chats("a").len(), 5);
    assert_eq!(mocks.chats("b").len(), 5);

    // The second replica never saw a fail itself, yet skips it.
    assert_eq!(chat_through(&second, "m").await, 200);
    assert_eq!(
        mocks.chats("a").len(),
        5,
        "the second replica did not ask a"
    );
    assert_eq!(mocks.chats("b").len(), 6);
    let entry = admin_entry_at(&on_second, "a").await;
    assert_eq!(entry["breaker"]["state"], "open", "{entry}");
    let left = open_for(&entry);
    assert!(
        left > Duration::from_secs(8) && left <= Duration::from_secs(11),
        "open for what is left of the first replica's 10 s: {left:?}"
    );

    // A replica started after the opening reads it before it serves.
    let third = mocks.proxy().start_binary().await;
    let on_third = replica_base(&third);
    let entry = admin_entry_at(&on_third, "a").await;
    assert_eq!(entry["breaker"]["state"], "open", "{entry}");
    let left = open_for(&entry);
    assert!(
        left > Duration::from_secs(5) && left <= Duration::from_secs(11),
        "{left:?}"
    );
    assert_eq!(
        series(&metrics_at(&on_third).await, gauge, &state),
        Some(2.0)
    );
    assert_eq!(chat_through(&third, "m").await, 200);
    assert_eq!(mocks.chats("a").len(), 5, "the third replica did not ask a");
    assert_eq!(mocks.chats("b").len(), 7);
}

// ----- model list --------------------------------------------------------

fn listing(ids: &[&str]) -> MockOptions {
    MockOptions {
        models: Some(ids.iter().map(|id| id.to_string()).collect()),
        ..MockOptions::default()
    }
}

/// Four upstreams whose lists overlap, one renamed, and two aliases.
fn model_fleet() -> Fleet {
    Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock_with(
            "a",
            listing(&["gpt-4o", "gpt-4o-mini", "o3", "o3-mini", "dall-e-3"]),
            1,
            r#"models = ["gpt-4o", "o3*"]"#,
        )
        .mock_with(
            "l",
            listing(&["meta-llama/Llama-3.1-70B-Instruct", "other-model"]),
            1,
            r#"models = ["llama-3.1-70b"]
model_names = { "llama-3.1-70b" = "meta-llama/Llama-3.1-70B-Instruct" }"#,
        )
        .mock_with(
            "c",
            listing(&["gpt-4o", "deepseek-chat", "deepseek-reasoner"]),
            1,
            r#"models = ["gpt-4o", "deepseek-chat"]"#,
        )
        .mock_with(
            "slow",
            listing(&["slow-1", "slow-2-large"]),
            1,
            r#"models = ["slow-1", "slow-2*"]"#,
        )
        .tail("\n[aliases]\n\"gpt-4\" = \"gpt-4o\"\n\"fast\" = \"o3-mini\"\n")
}

fn ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data: {list}"))
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn the_model_list_merges_every_upstream_and_a_hanging_one_costs_at_most_two_seconds() {
    let (app, mocks) = model_fleet().start().await;
    mocks.get("slow").delay_heads(Duration::from_secs(10));
    let started = Instant::now();
    let response = app.models().await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(took < Duration::from_millis(2500), "{took:?}");
    let list: Value = response.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(
        ids(&list),
        [
            "deepseek-chat",
            "fast",
            "gpt-4",
            "gpt-4o",
            "llama-3.1-70b",
            "o3",
            "o3-mini",
            // The hanging upstream's exact names; its pattern names no model.
            "slow-1",
        ]
    );
    for name in ["a", "l", "c", "slow"] {
        assert_eq!(mocks.get(name).models_fetches(), 1, "{name}");
    }
}

#[tokio::test]
async fn one_model_answers_the_same_entry_as_the_list_for_aliases_and_renamed_models() {
    let (app, _mocks) = model_fleet().start().await;
    let list: Value = app.models().await.unwrap().json().await.unwrap();
    assert_eq!(ids(&list).len(), 9, "{list}");
    for id in [
        "gpt-4o",
        "gpt-4",
        "fast",
        "llama-3.1-70b",
        "deepseek-chat",
        "slow-2-large",
    ] {
        let listed = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|model| model["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {list}"))
            .clone();
        let one = app
            .authorised(reqwest::Method::GET, &format!("/v1/models/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(one.status(), 200, "{id}");
        assert_eq!(one.json::<Value>().await.unwrap(), listed, "{id}");
    }
    let unknown = app
        .authorised(reqwest::Method::GET, "/v1/models/other-model")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404, "outside l's patterns");
}

// ----- operations --------------------------------------------------------

#[tokio::test]
async fn a_reload_adds_an_upstream_within_two_seconds_while_a_stream_on_the_old_set_finishes() {
    let (proxy, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", r#"models = ["m"]"#)
        .prepare()
        .await;
    let proxy = proxy.start_binary().await;
    let client = reqwest::Client::new();
    let chat_at = |model: &str| {
        client
            .post(proxy.url(CHAT_PATH))
            .bearer_auth(CLIENT_TOKEN)
            .json(&chat_body(model))
            .send()
    };
    assert_eq!(chat_at("only-c").await.unwrap().status(), 404);

    let running = client
        .post(proxy.url(CHAT_PATH))
        .bearer_auth(CLIENT_TOKEN)
        .header("x-mock-chunks", "30")
        .header("x-mock-interval-ms", "100")
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    let mut body = running.bytes_stream();
    let mut streamed = body.next().await.unwrap().unwrap().to_vec();

    let c = MockUpstream::start().await;
    let added = table(
        &mocks.dir,
        "c",
        &format!("{}/v1", c.base_url()),
        1,
        r#"models = ["only-c"]"#,
    );
    let replacement = mocks.file.with_extension("new");
    std::fs::write(&replacement, format!("{}{added}", mocks.text)).unwrap();
    let written = Instant::now();
    std::fs::rename(&replacement, &mocks.file).unwrap();
    let routed = eventually(Duration::from_secs(5), async || {
        chat_at("only-c").await.unwrap().status() == 200
    })
    .await;
    let took = written.elapsed();
    assert!(routed, "only-c never reached c");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(chats(&c).len(), 1);
    assert_eq!(chats(&c)[0].key(), Some(key("c", 1).as_str()));

    assert_eq!(mocks.get("a").streams_completed(), 0, "still streaming");
    while let Some(chunk) = body.next().await {
        streamed.extend_from_slice(&chunk.expect("the stream is not cut by the reload"));
    }
    let streamed = String::from_utf8(streamed).unwrap();
    assert!(streamed.contains("chunk-29 "), "{streamed}");
    assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
    assert_eq!(mocks.chats("a").len(), 1);
}

#[tokio::test]
async fn admin_upstreams_shows_each_upstream_without_a_key_and_readyz_names_their_breakers() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock_with(
            "a",
            MockOptions::default(),
            2,
            "models = [\"gpt-4o\", \"o3*\"]\nweight = 3\ntier = 0",
        )
        .mock("b", "models = [\"bm\"]\ntier = 1")
        .start()
        .await;
    mocks
        .get("b")
        .answer_key(&key("b", 1), 429, &[("retry-after", "60")]);
    assert_eq!(chat(&app, "bm").await.status(), 429);

    let answer = app.admin_get("/admin/upstreams").await;
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    for secret in [key("a", 1), key("a", 2), key("b", 1)] {
        assert!(!text.contains(&secret), "{text}");
    }
    for secret in [CLIENT_TOKEN, ADMIN_TOKEN] {
        assert!(!text.contains(secret), "{text}");
    }
    let listed: Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = listed["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|upstream| upstream["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        listed["upstreams"][0],
        json!({
            "name": "a",
            "tier": 0,
            "weight": 3,
            "models": ["gpt-4o", "o3*"],
            "breaker": {"state": "closed", "closes_at": null},
            "in_flight": 0,
            "last_failure": null,
            "keys": [
                {"position": 1, "state": "usable", "resting_until": null},
                {"position": 2, "state": "usable", "resting_until": null},
            ],
        })
    );
    let b = &listed["upstreams"][1];
    assert_eq!(b["tier"], 1);
    assert_eq!(b["weight"], 1);
    assert_eq!(b["models"], json!(["bm"]));
    assert_eq!(b["in_flight"], 0);
    assert_eq!(b["last_failure"], "status_429");
    assert_eq!(b["keys"][0]["position"], 1);
    assert_eq!(b["keys"][0]["state"], "resting");
    assert_rfc3339(b["keys"][0]["resting_until"].as_str().unwrap());
    assert_eq!(b["keys"].as_array().unwrap().len(), 1);

    let unauthorised = app
        .client
        .get(app.url("/admin/upstreams"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), 401);

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["upstreams"], json!({"a": "closed", "b": "closed"}));
}

#[tokio::test]
async fn each_upstreams_keys_are_counted_under_its_own_name() {
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 1")
        .mock("a", "models = [\"am\"]")
        .mock("b", "models = [\"bm\"]")
        .start()
        .await;
    mocks
        .get("b")
        .answer_key(&key("b", 1), 429, &[("retry-after", "60")]);
    assert_eq!(chat(&app, "am").await.status(), 200);
    assert_eq!(chat(&app, "am").await.status(), 200);
    assert_eq!(chat(&app, "bm").await.status(), 429);

    // Both pools have a key at position 1: only the upstream label keeps them apart.
    let text = metrics_at(&base(&app)).await;
    let of = |family: &str, upstream: &str| {
        series(&text, family, &[("upstream", upstream), ("key", "1")])
    };
    let requests = "llm_proxy_upstream_key_requests_total";
    assert_eq!(of(requests, "a"), Some(2.0), "{text}");
    assert_eq!(of(requests, "b"), Some(1.0), "{text}");
    let limited = "llm_proxy_upstream_key_rate_limited_total";
    assert_eq!(of(limited, "a"), None, "{text}");
    assert_eq!(of(limited, "b"), Some(1.0), "{text}");
    let resting = "llm_proxy_upstream_key_resting";
    assert_eq!(of(resting, "a"), Some(0.0), "{text}");
    assert_eq!(of(resting, "b"), Some(1.0), "{text}");
    let disabled = "llm_proxy_upstream_key_disabled";
    assert_eq!(of(disabled, "a"), Some(0.0), "{text}");
    assert_eq!(of(disabled, "b"), Some(0.0), "{text}");
    for family in [requests, limited, resting, disabled] {
        assert_eq!(series(&text, family, &[("key", "1")]), None, "{text}");
    }
}

#[tokio::test]
async fn an_alias_cannot_open_a_model_the_clients_list_does_not_allow() {
    let clients = scratch_dir("routing-clients").join("clients.toml");
    std::fs::write(
        &clients,
        r#"
[clients.alice]
token = "tok-alice"
models = ["fast"]

[clients.bob]
token = "tok-bob"
models = ["fast", "gpt-4o-mini"]
"#,
    )
    .unwrap();
    let (app, mocks) = Fleet::new("default = \"a\"\nmax_attempts = 3")
        .mock("a", r#"models = ["gpt-4o-mini"]"#)
        .tail("\n[aliases]\n\"fast\" = \"gpt-4o-mini\"\n")
        .env("CLIENTS_FILE", clients.to_str().unwrap())
        .start()
        .await;
    assert_json_error(
        app.chat("tok-alice", chat_body("fast")).await,
        403,
        "model_not_allowed",
        "This client may not use the requested model",
    )
    .await;
    assert!(sent_to(mocks.get("a")).is_empty());

    let allowed = app.chat("tok-bob", chat_body("fast")).await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(mocks.chats("a").len(), 1);
    assert_eq!(mocks.chats("a")[0].json().unwrap()["model"], "gpt-4o-mini");
}
