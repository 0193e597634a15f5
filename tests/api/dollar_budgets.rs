//! Dollar budgets (`usd_per_day`, `usd_per_month`) through the real proxy, priced by the
//! upstreams file's `[prices]`, in front of a mock upstream that reports usage: a reservation
//! before the call, the actual cost after it, refusals that send nothing, and the spend kept
//! across a restart (`STATE_DIR`) and shared by two replicas (Redis).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mock_upstream::MockUpstream;
use serde_json::{Value, json};

use crate::clients::scratch_dir;
use crate::helpers::*;
use crate::process::drain;
use crate::redis_server::RedisServer;

/// Prices in nano-dollars per token, as the file below writes them per million tokens:
/// $10/M in, $5/M cached, $100/M out (dear, so that a few requests spend cents).
const INPUT: u64 = 10_000;
const CACHED_INPUT: u64 = 5_000;
const OUTPUT: u64 = 100_000;
/// The mock's usage of a plain chat: 7 prompt and 6 completion tokens.
const CHAT_COST: u64 = 7 * INPUT + 6 * OUTPUT;
const CENT: u64 = 10_000_000;

fn upstreams_file(dir: &Path, upstream: &MockUpstream) -> PathBuf {
    let file = dir.join("upstreams.toml");
    std::fs::write(
        &file,
        format!(
            "default = \"main\"\n\
             [prices]\n\
             \"gpt-mock\" = {{ input = 10.0, cached_input = 5.0, output = 100.0 }}\n\
             [upstreams.main]\nbase_url = \"{}/v1\"\nkeys_env = \"MOCK_KEYS\"\nmodels = [\"*\"]\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    file
}

/// A scratch directory with the clients file `clients` and an upstreams file pricing the mock.
fn files(name: &str, upstream: &MockUpstream, clients: &str) -> (PathBuf, Proxy) {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("clients.toml"), clients).unwrap();
    let proxy = Proxy::new()
        .env(
            "UPSTREAMS_FILE",
            upstreams_file(&dir, upstream).to_str().unwrap(),
        )
        .env("MOCK_KEYS", UPSTREAM_KEY)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .clients_file(&dir.join("clients.toml"));
    (dir, proxy)
}

/// A chat with `max_tokens`, and what it reserves: its bytes (as reqwest sends them) at a token
/// per 4, at `INPUT`, and its cap at `OUTPUT`.
fn capped_chat(max_tokens: u64) -> (Vec<u8>, u64) {
    let body = serde_json::to_vec(&json!({
        "model": "gpt-mock",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}]
    }))
    .unwrap();
    let reserved = (body.len() as u64).div_ceil(4) * INPUT + max_tokens * OUTPUT;
    (body, reserved)
}

async fn post(
    base: &str,
    token: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("the proxy answers")
}

async fn usage_at(base: &str, name: &str) -> Value {
    admin_client(base, name)
        .await
        .unwrap_or_else(|| panic!("{name} is listed"))
}

/// A JSON number of dollars back into nano-dollars (exact for these amounts).
fn nanos(usd: &Value) -> u64 {
    (usd.as_f64().unwrap_or_else(|| panic!("{usd} is a number")) * 1e9).round() as u64
}

/// `usd_today` once nothing of `name` is in flight any more (a settlement lands when the
/// answer's last byte has gone, a moment after the caller read it).
async fn settled_today(base: &str, name: &str) -> u64 {
    let settled = eventually(Duration::from_secs(5), async || {
        usage_at(base, name).await["usage"]["in_flight"] == 0
    })
    .await;
    assert!(settled, "{name}'s requests end");
    nanos(&usage_at(base, name).await["usage"]["usd_today"])
}

fn dollars(nanos: u64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

fn secs_until_midnight() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (now / 86_400 + 1) * 86_400 - now
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn twenty_concurrent_requests_never_spend_past_a_one_cent_budget() {
    let upstream = MockUpstream::start().await;
    let (_dir, proxy) = files(
        "usd-concurrent",
        &upstream,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 0.01\n",
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    let (body, reserved) = capped_chat(20);
    // Each reserves more than three times what it costs: at once, four fit in a cent.
    assert!(reserved > 3 * CHAT_COST && reserved * 4 <= CENT && reserved * 5 > CENT);

    let before = secs_until_midnight();
    let answers =
        futures::future::join_all((0..20).map(|_| post(&base, "tok-alice", body.clone(), &[])))
            .await;
    let after = secs_until_midnight();
    let mut admitted = 0;
    for answer in answers {
        match answer.status().as_u16() {
            200 => {
                admitted += 1;
                answer.bytes().await.unwrap();
            }
            429 => {
                let retry: u64 = answer.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    retry <= before && retry >= after,
                    "until midnight UTC: {retry}"
                );
                assert_eq!(error_code(answer).await, "budget_exceeded");
            }
            other => panic!("status {other}"),
        }
    }
    let spent = settled_today(&base, "alice").await;
    // What was spent is exactly the answers' cost, and with every answer within its
    // reservation it is within the budget.
    assert_eq!(spent, admitted * CHAT_COST);
    assert!(spent <= CENT, "{spent} nano-dollars spent of {CENT}");
    // The four that fit at once were never refused, whatever the order.
    assert!(admitted >= CENT / reserved, "{admitted} admitted");
    let mut refusals = 20 - admitted;
    // One by one, the rest of the budget: a request goes while what was spent leaves room for
    // its reservation, so the whole day admits exactly the n answers with
    // (n - 1) x cost + reservation <= budget, however many came at once before.
    let fitting = (CENT - reserved) / CHAT_COST + 1;
    loop {
        let answer = post(&base, "tok-alice", body.clone(), &[]).await;
        if answer.status() == 429 {
            refusals += 1;
            break;
        }
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
        admitted += 1;
        settled_today(&base, "alice").await;
    }
    assert_eq!(admitted, fitting);
    assert_eq!(settled_today(&base, "alice").await, fitting * CHAT_COST);
    assert!(fitting * CHAT_COST <= CENT);
    assert_eq!(
        app.upstream.requests_started() as u64,
        admitted,
        "the refused never went upstream"
    );
    assert_eq!(
        app.metric("llm_proxy_limit_refusals_total{client=\"alice\",reason=\"usd_per_day\"}")
            .await as u64,
        refusals
    );
}

#[tokio::test]
async fn an_answer_dearer_than_its_reservation_passes_the_budget_by_that_difference_only() {
    let upstream = MockUpstream::start().await;
    let (_dir, proxy) = files(
        "usd-overshoot",
        &upstream,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 0.01\n",
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    let (body, reserved) = capped_chat(20);
    // An upstream that ignores max_tokens: 60 completion tokens where 20 were reserved (and 3
    // of the 7 prompt tokens cached).
    let usage = [(
        "x-mock-usage",
        r#"{"prompt_tokens":7,"completion_tokens":60,"total_tokens":67,"prompt_tokens_details":{"cached_tokens":3}}"#,
    )];
    let cost = 4 * INPUT + 3 * CACHED_INPUT + 60 * OUTPUT;
    assert!(cost > reserved);
    let mut spent = 0;
    loop {
        let answer = post(&base, "tok-alice", body.clone(), &usage).await;
        if answer.status() == 429 {
            assert_eq!(error_code(answer).await, "budget_exceeded");
            break;
        }
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
        // Admitted: what was spent before left room for its reservation.
        assert!(spent + reserved <= CENT);
        spent = settled_today(&base, "alice").await;
    }
    assert_eq!(spent, 2 * cost, "two answers of {cost} nano-dollars");
    // Past the budget by no more than the last answer's cost above its reservation.
    assert!(spent > CENT && spent <= CENT + (cost - reserved), "{spent}");
}

#[tokio::test]
async fn a_month_budget_refuses_until_the_first_of_next_month() {
    let upstream = MockUpstream::start().await;
    let (body, reserved) = capped_chat(20);
    // Room for the first answer and a reservation less one nano-dollar.
    let budget = CHAT_COST + reserved - 1;
    let (_dir, proxy) = files(
        "usd-month",
        &upstream,
        &format!(
            "[clients.bob]\ntoken = \"tok-bob\"\nusd_per_month = {}\n",
            dollars(budget)
        ),
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    let first = post(&base, "tok-bob", body.clone(), &[]).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    assert_eq!(settled_today(&base, "bob").await, CHAT_COST);
    let until = || llm_proxy::vocab::calendar::until_next_month(SystemTime::now()).as_secs();
    let before = until() + 1;
    let second = post(&base, "tok-bob", body, &[]).await;
    let after = until();
    assert_eq!(second.status(), 429);
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry <= before && retry >= after,
        "{retry} s, the month ends in {after} to {before} s"
    );
    assert_eq!(error_code(second).await, "budget_exceeded");
    let bob = usage_at(&base, "bob").await;
    assert_eq!(nanos(&bob["usage"]["usd_this_month"]), CHAT_COST);
    assert_eq!(nanos(&bob["limits"]["usd_per_month"]), budget);
    assert_eq!(
        app.metric("llm_proxy_limit_refusals_total{client=\"bob\",reason=\"usd_per_month\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_unpriced_model_is_refused_for_a_budgeted_client_with_nothing_sent() {
    let upstream = MockUpstream::start().await;
    let (_dir, proxy) = files(
        "usd-unpriced",
        &upstream,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_month = 5\n\
         [clients.free]\ntoken = \"tok-free\"\n",
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    let body = serde_json::to_vec(&json!({"model": "gpt-mock-mini", "messages": []})).unwrap();
    let refused = post(&base, "tok-alice", body.clone(), &[]).await;
    assert_json_error(
        refused,
        403,
        "model_unpriced",
        "This client has a dollar budget and the requested model has no price at an upstream \
         that may serve it",
    )
    .await;
    // No model to price at all: refused as well.
    let nameless = serde_json::to_vec(&json!({"messages": []})).unwrap();
    let refused = post(&base, "tok-alice", nameless, &[]).await;
    assert_eq!(refused.status(), 400);
    assert_eq!(error_code(refused).await, "model_required");
    assert_eq!(app.upstream.requests_started(), 0, "nothing was sent");
    // A client without a dollar budget is served.
    let served = post(&base, "tok-free", body, &[]).await;
    assert_eq!(served.status(), 200);
    assert_eq!(app.upstream.requests_started(), 1);
    assert_eq!(
        app.metric("llm_proxy_limit_refusals_total{client=\"alice\",reason=\"model_unpriced\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn hostile_output_caps_are_refused_for_their_own_fault_and_cost_nothing() {
    let upstream = MockUpstream::start().await;
    let (_dir, proxy) = files(
        "usd-hostile",
        &upstream,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 1\n",
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    let huge = serde_json::to_vec(&json!({
        "model": "gpt-mock", "max_tokens": u64::MAX, "messages": []
    }))
    .unwrap();
    // The smaller copy first: the largest is what is reserved, whichever the upstream reads.
    let twice =
        br#"{"model":"gpt-mock","max_tokens":1,"max_tokens":100000,"messages":[]}"#.to_vec();
    for body in [huge, twice] {
        assert_json_error(
            post(&base, "tok-alice", body, &[]).await,
            413,
            "request_exceeds_limit",
            "The request's cost reservation exceeds this client's usd_per_day; lower max_tokens \
             or shorten the prompt",
        )
        .await;
    }
    for cap in ["-1", "1.5", "\"100\"", "1e3"] {
        let body = format!(r#"{{"model":"gpt-mock","max_tokens":{cap},"messages":[]}}"#);
        let answer = post(&base, "tok-alice", body.into_bytes(), &[]).await;
        assert_eq!(answer.status(), 400, "{cap}");
        assert_eq!(error_code(answer).await, "invalid_request");
    }
    // An error answer of the upstream costs nothing either.
    let (body, _) = capped_chat(10);
    let failed = post(&base, "tok-alice", body, &[("x-mock-status", "500")]).await;
    assert_eq!(failed.status(), 500);
    failed.bytes().await.unwrap();
    assert_eq!(app.upstream.requests_started(), 1, "only the last was sent");
    assert_eq!(settled_today(&base, "alice").await, 0);
}

#[tokio::test]
async fn a_stream_that_reports_no_usage_keeps_its_reservation() {
    let upstream = MockUpstream::start().await;
    let (_dir, proxy) = files(
        "usd-stream",
        &upstream,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 1\n\
         default_output_reservation = 50\n",
    );
    let app = proxy.owning(upstream).start_in_process().await;
    let base = app.url("");
    // No max_tokens: the client's default_output_reservation is reserved.
    let body = serde_json::to_vec(&json!({
        "model": "gpt-mock", "stream": true, "messages": [{"role": "user", "content": "hi"}]
    }))
    .unwrap();
    let reserved = (body.len() as u64).div_ceil(4) * INPUT + 50 * OUTPUT;
    let answer = post(&base, "tok-alice", body, &[("x-mock-chunks", "3")]).await;
    assert_eq!(answer.status(), 200);
    let (text, broken) = read_stream(answer).await;
    assert!(!broken && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(settled_today(&base, "alice").await, reserved, "never $0");
    // With usage asked for, it settles at its cost: 7 prompt, 3 completion tokens.
    let body = serde_json::to_vec(&json!({
        "model": "gpt-mock", "stream": true, "stream_options": {"include_usage": true},
        "messages": []
    }))
    .unwrap();
    let answer = post(&base, "tok-alice", body, &[("x-mock-chunks", "3")]).await;
    read_stream(answer).await;
    assert_eq!(
        settled_today(&base, "alice").await,
        reserved + 7 * INPUT + 3 * OUTPUT
    );
    let alice = usage_at(&base, "alice").await;
    assert_eq!(
        alice["limits"],
        json!({"usd_per_day": 1.0, "default_output_reservation": 50, "disabled": false})
    );
}

#[tokio::test]
async fn the_dollar_budget_survives_a_restart() {
    let upstream = MockUpstream::start().await;
    let (body, reserved) = capped_chat(20);
    // Room for three answers, not for a fourth's reservation.
    let budget = 3 * CHAT_COST + reserved - 1;
    let (dir, proxy) = files(
        "usd-restart",
        &upstream,
        &format!(
            "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = {}\n",
            dollars(budget)
        ),
    );
    let state = dir.join("state");
    let start = |proxy: Proxy| {
        proxy
            .env("STATE_DIR", state.to_str().unwrap())
            .in_dir(&dir)
            .start_binary()
    };
    let mut first = start(proxy).await;
    let base = first.url("");
    for _ in 0..2 {
        let answer = post(&base, "tok-alice", body.clone(), &[]).await;
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
    }
    assert_eq!(settled_today(&base, "alice").await, 2 * CHAT_COST);
    first.signal("-TERM");
    assert!(first.child.wait().await.unwrap().success());
    drain(&mut first.log);
    let file: Value =
        serde_json::from_slice(&std::fs::read(state.join("budgets.json")).unwrap()).unwrap();
    assert_eq!(file["version"], 1);
    assert_eq!(file["nanos_today"]["alice"], 2 * CHAT_COST);
    assert_eq!(file["nanos_this_month"]["alice"], 2 * CHAT_COST);

    let (_, proxy) = files(
        "usd-restart-again",
        &upstream,
        &std::fs::read_to_string(dir.join("clients.toml")).unwrap(),
    );
    let second = start(proxy).await;
    let base = second.url("");
    let alice = usage_at(&base, "alice").await;
    assert_eq!(nanos(&alice["usage"]["usd_today"]), 2 * CHAT_COST);
    let third = post(&base, "tok-alice", body.clone(), &[]).await;
    assert_eq!(third.status(), 200);
    third.bytes().await.unwrap();
    assert_eq!(settled_today(&base, "alice").await, 3 * CHAT_COST);
    let fourth = post(&base, "tok-alice", body, &[]).await;
    assert_eq!(fourth.status(), 429, "the restart forgot nothing");
    assert_eq!(error_code(fourth).await, "budget_exceeded");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn two_replicas_sharing_redis_share_one_dollar_budget() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let (body, reserved) = capped_chat(20);
    // Room for four answers, not for a fifth's reservation.
    let budget = 4 * CHAT_COST + reserved - 1;
    let clients = format!(
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = {}\nusd_per_month = 100\n",
        dollars(budget)
    );
    let mut replicas = Vec::new();
    for name in ["usd-replica-a", "usd-replica-b"] {
        let (_, proxy) = files(name, &upstream, &clients);
        let proxy = proxy.env("REDIS_URL", redis.url()).start_binary().await;
        assert!(
            proxy.startup_log.contains("shared state mode: shared"),
            "{}",
            proxy.startup_log
        );
        replicas.push(proxy);
    }
    let bases: Vec<String> = replicas.iter().map(|proxy| proxy.url("")).collect();
    let mut statuses = Vec::new();
    for round in 0..6 {
        let base = &bases[round % 2];
        let answer = post(base, "tok-alice", body.clone(), &[]).await;
        statuses.push(answer.status().as_u16());
        answer.bytes().await.unwrap();
        settled_today(base, "alice").await;
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    assert_eq!(upstream.requests_started(), 4);
    for base in &bases {
        let alice = usage_at(base, "alice").await;
        assert_eq!(nanos(&alice["usage"]["usd_today"]), 4 * CHAT_COST, "{base}");
        assert_eq!(
            nanos(&alice["usage"]["usd_this_month"]),
            4 * CHAT_COST,
            "{base}"
        );
    }
    let ttl = redis.command(&["PTTL", "llm-proxy:{client:alice}:usd"]);
    assert!(ttl.starts_with(':') && !ttl.starts_with(":-"), "{ttl}");
}

/// Two upstreams serve the model, the second at twice the first's prices: a request reserves
/// at the dearer, and costs what the one that served it charges.
#[tokio::test]
async fn a_reservation_covers_the_dearest_failover_and_the_upstream_that_served_prices_it() {
    let upstream = MockUpstream::start().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = scratch_dir("usd-failover");
    let (body, reserved_at_cheap) = capped_chat(20);
    let reserved = 2 * reserved_at_cheap;
    let cost_at_dear = 2 * CHAT_COST;
    // Room for one answer at the dear price and one reservation at it, less a nano-dollar.
    let budget = cost_at_dear + reserved - 1;
    std::fs::write(
        dir.join("clients.toml"),
        format!(
            "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = {}\n",
            dollars(budget)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("upstreams.toml"),
        format!(
            "default = \"cheap\"\n\
             [prices]\n\"gpt-mock\" = {{ input = 10.0, output = 100.0 }}\n\
             [upstreams.cheap]\nbase_url = \"http://127.0.0.1:{closed}/v1\"\n\
             keys_env = \"MOCK_KEYS\"\nmodels = [\"gpt-mock\"]\ntier = 0\n\
             [upstreams.dear]\nbase_url = \"{}/v1\"\nkeys_env = \"MOCK_KEYS\"\n\
             models = [\"gpt-mock\"]\ntier = 1\n\
             [upstreams.dear.prices]\n\"gpt-mock\" = {{ input = 20.0, output = 200.0 }}\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    let app = Proxy::new()
        .env(
            "UPSTREAMS_FILE",
            dir.join("upstreams.toml").to_str().unwrap(),
        )
        .env("MOCK_KEYS", UPSTREAM_KEY)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .clients_file(&dir.join("clients.toml"))
        .owning(upstream)
        .start_in_process()
        .await;
    let base = app.url("");
    // The cheap one refuses the connection: the dear one answers, and its price is the cost.
    let answer = post(&base, "tok-alice", body.clone(), &[]).await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.unwrap();
    assert_eq!(settled_today(&base, "alice").await, cost_at_dear);
    // At the cheap upstream's prices a second would fit; at the dear one's it does not.
    assert!(cost_at_dear + reserved_at_cheap <= budget && cost_at_dear + reserved > budget);
    let refused = post(&base, "tok-alice", body, &[]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(error_code(refused).await, "budget_exceeded");
    assert_eq!(app.upstream.requests_started(), 1);
}
