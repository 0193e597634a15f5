//! Per-client limits kept in Redis (`REDIS_URL`): two real proxy processes sharing one real
//! `redis-server` enforce one limit between them; when Redis stops each enforces its share
//! (`REDIS_FALLBACK_REPLICAS`), starting from its share of what the client had used, and the
//! outage's budget charges reach Redis once it is back; a
//! replica killed mid-stream does not hold its concurrency slot past the slot's expiry.

use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_upstream::MockUpstream;
use serde_json::Value;

use crate::clients::{chat_body, scratch_dir};
use crate::helpers::*;
use crate::redis_server::RedisServer;

const TIMEOUT_MS: u64 = 250;
/// The slot TTL the kill test sets through the test-only knob.
const SHORT_SLOT_TTL_MS: u64 = 1500;

async fn replica(
    upstream: &MockUpstream,
    redis: &RedisServer,
    clients: &std::path::Path,
    extra: &[(&str, &str)],
) -> RunningProxy {
    let proxy = Proxy::new()
        .env("TARGET_HOST", upstream.base_url())
        .env("AUTH_BEARER", UPSTREAM_KEY)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .clients_file(clients)
        .env("REDIS_URL", redis.url())
        .env("REDIS_TIMEOUT_MS", TIMEOUT_MS.to_string())
        .envs(extra)
        .start_binary()
        .await;
    assert!(
        proxy.startup_log.contains("shared state mode: shared"),
        "{}",
        proxy.startup_log
    );
    proxy
}

fn clients_file(text: &str) -> std::path::PathBuf {
    let file = scratch_dir("shared-limits").join("clients.toml");
    std::fs::write(&file, text).unwrap();
    file
}

async fn chat(proxy: &RunningProxy) -> reqwest::Response {
    chat_as(proxy, "tok-alice").await
}

async fn chat_as(proxy: &RunningProxy, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&chat_body("gpt-mock"))
        .send()
        .await
        .expect("the replica answers")
}

/// A streamed chat of `chunks` chunks 100 ms apart.
async fn slow_stream(proxy: &RunningProxy, chunks: u32) -> reqwest::Response {
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .header("x-mock-chunks", chunks.to_string())
        .header("x-mock-interval-ms", "100")
        .json(&serde_json::json!({"model": "gpt-mock", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .or_else(|| body["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn usage(proxy: &RunningProxy) -> Value {
    usage_of(proxy, "alice").await
}

async fn usage_of(proxy: &RunningProxy, name: &str) -> Value {
    proxy.admin_usage(name).await
}

async fn readyz_limits(proxy: &RunningProxy) -> Value {
    let body: Value = reqwest::get(proxy.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["limits"].clone()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_five_a_minute_client_gets_exactly_five_answers_across_two_replicas() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file = clients_file("[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 5\n");
    let a = replica(&upstream, &redis, &file, &[]).await;
    let b = replica(&upstream, &redis, &file, &[]).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    for round in 0..10 {
        let proxy = if round % 2 == 0 { &a } else { &b };
        let response = chat(proxy).await;
        let status = response.status().as_u16();
        statuses.push(status);
        if round < 5 {
            assert_eq!(
                header(&response, "x-ratelimit-remaining-requests"),
                (4 - round).to_string(),
                "one count for both replicas"
            );
        } else {
            // The first place frees 12 s after the first request: honest, rounded up.
            let retry: u64 = header(&response, "retry-after").parse().unwrap();
            let left = Duration::from_secs(12).saturating_sub(started.elapsed());
            assert!(
                retry >= left.as_secs() && retry <= 12,
                "Retry-After {retry} with {left:?} left"
            );
            assert_eq!(error_code(response).await, "rate_limited");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    assert_eq!(
        upstream.requests().len(),
        5,
        "the refused never went upstream"
    );

    // Every key has the client's hash tag and an expiry.
    let names = redis.command(&["KEYS", "llm-proxy:*"]);
    let names: Vec<&str> = names
        .lines()
        .filter(|line| line.starts_with("llm-proxy:"))
        .collect();
    assert!(!names.is_empty());
    for name in names {
        assert!(name.starts_with("llm-proxy:{client:alice}:"), "{name}");
        let ttl = redis.command(&["PTTL", name]);
        assert!(
            ttl.starts_with(':') && !ttl.starts_with(":-"),
            "{name}: {ttl}"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_concurrency_limit_and_a_daily_budget_hold_across_replicas() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file = clients_file(
        "[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 1\n\n\
         [clients.bob]\ntoken = \"tok-bob\"\ntokens_per_day = 20\n",
    );
    let a = replica(&upstream, &redis, &file, &[]).await;
    let b = replica(&upstream, &redis, &file, &[]).await;

    // A slow stream on A holds alice's only place.
    let mut stream = slow_stream(&a, 5).await.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let refused = chat(&b).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(error_code(refused).await, "rate_limited");
    assert_eq!(
        usage(&b).await["in_flight"],
        1,
        "B sees A's request in flight"
    );
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    drop(stream);
    // Once the stream has ended (and A's settlement reached Redis), B is admitted.
    assert!(
        eventually(Duration::from_secs(5), async || {
            chat(&b).await.status() == 200
        })
        .await,
        "B is admitted once A's stream has ended"
    );

    // A chat uses 13 tokens (7 prompt, 6 completion) of bob's 20 a day, charged on A; the
    // budget is shared, so B refuses the next one.
    assert_eq!(chat_as(&a, "tok-bob").await.status(), 200);
    assert!(
        eventually(Duration::from_secs(5), async || {
            usage_of(&b, "bob").await["tokens_today"] == 13
        })
        .await,
        "B sees the tokens A charged"
    );
    let refused = chat_as(&b, "tok-bob").await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(
        retry > 0 && retry <= 24 * 60 * 60,
        "until midnight UTC: {retry}"
    );
    assert_eq!(error_code(refused).await, "quota_exceeded");
    assert_eq!(
        usage_of(&a, "bob").await["tokens_today"],
        13,
        "the refusal charged nothing"
    );
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn without_redis_each_replica_enforces_its_share_and_the_outage_charges_reach_redis() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file = clients_file(
        "[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 4\n\
         tokens_per_day = 1000000\n\n[clients.bob]\ntoken = \"tok-bob\"\ntokens_per_day = 40\n",
    );
    let extra = [("REDIS_FALLBACK_REPLICAS", "2")];
    let a = replica(&upstream, &redis, &file, &extra).await;
    let b = replica(&upstream, &redis, &file, &extra).await;
    assert_eq!(chat(&a).await.status(), 200, "warm: the connection is up");
    // Its settlement is in Redis before Redis stops (else it would join the outage charges).
    assert!(
        eventually(Duration::from_secs(5), async || {
            usage(&a).await["tokens_today"] == 13
        })
        .await,
        "the first chat is settled in Redis"
    );
    assert_eq!(chat_as(&a, "tok-bob").await.status(), 200);
    assert!(
        eventually(Duration::from_secs(5), async || {
            usage_of(&a, "bob").await["tokens_today"] == 13
        })
        .await,
        "bob's chat is settled in Redis"
    );

    redis.stop();
    // 4 a minute over 2 replicas: 2 each, decided locally, none waiting longer than the timeout.
    // A starts from what Redis told it: alice's chat there used a quarter of her minute, so
    // the same part of A's 2 (one left); B never decided for her and starts empty. 3 in all,
    // what was left of her 4.
    for (proxy, expected) in [(&a, [200, 429, 429]), (&b, [200, 200, 429])] {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let response = chat(proxy).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(TIMEOUT_MS + 500),
                "a request took {took:?} with Redis down"
            );
            statuses.push(response.status().as_u16());
            let _ = response.bytes().await;
        }
        assert_eq!(
            statuses, expected,
            "half the limit each, less what was used"
        );
        assert_eq!(readyz_limits(proxy).await, "local");
    }
    // Bob's 40 a day is 20 on each replica, less its share of the 13 Redis had counted (7): a
    // chat charging its estimate (16 tokens) no longer fits.
    let refused = chat_as(&a, "tok-bob").await;
    assert_eq!(
        refused.status(),
        429,
        "the outage does not hand out a fresh budget"
    );
    assert_eq!(error_code(refused).await, "quota_exceeded");

    // Redis comes back empty (no persistence): the two replicas' outage charges, 1 and 2 chats
    // of 13 tokens each, are added to it.
    redis.restart();
    for proxy in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(5), async || {
                readyz_limits(proxy).await == "shared"
            })
            .await,
            "shared again"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), async || {
            usage(&b).await["tokens_today"] == 39
        })
        .await,
        "the outage charges reach Redis: {}",
        redis.command(&["HGETALL", "llm-proxy:{client:alice}:day"])
    );
    let day: String = redis.command(&["HGET", "llm-proxy:{client:alice}:day", "tokens"]);
    assert!(day.contains("39"), "{day}");
    // And the limit is shared again: the fresh Redis has the whole minute's 4.
    let mut admitted = 0;
    for round in 0..6 {
        let proxy = if round % 2 == 0 { &a } else { &b };
        if chat(proxy).await.status() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4);
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_replica_killed_mid_stream_does_not_hold_its_slot_past_the_expiry() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file =
        clients_file("[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 1\n");
    let ttl = SHORT_SLOT_TTL_MS.to_string();
    let extra = [("LLM_PROXY_TEST_SLOT_TTL_MS", ttl.as_str())];
    let mut a = replica(&upstream, &redis, &file, &extra).await;
    let b = replica(&upstream, &redis, &file, &extra).await;

    let mut stream = slow_stream(&a, 100).await.bytes_stream();
    // Longer than the slot TTL: the live stream's slot is refreshed, so B is still refused.
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(SHORT_SLOT_TTL_MS * 2) {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(chat(&b).await.status(), 429, "a live slot does not expire");

    a.child.start_kill().unwrap();
    let _ = a.child.wait().await;
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), async || {
            chat(&b).await.status() == 200
        })
        .await,
        "the dead replica's slot expires"
    );
    let took = killed.elapsed();
    assert!(
        killed.elapsed() < Duration::from_millis(SHORT_SLOT_TTL_MS + 2000),
        "freed {took:?} after the kill"
    );
}

/// The Redis limiter alone (no server around it), on `redis`, with `extra` settings.
async fn redis_limiter(
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> llm_proxy::policy::RedisLimiter {
    let url = redis.url();
    let mut vars = vec![("AUTH_BEARER", "k"), ("REDIS_URL", url.as_str())];
    vars.extend_from_slice(extra);
    let config = config_from(&vars);
    let shared =
        llm_proxy::shared::Shared::new(&config.shared, llm_proxy::ops::metrics::Metrics::new());
    shared.first_contact().await;
    llm_proxy::policy::RedisLimiter::new(shared, Duration::from_secs(30))
}

/// The limiter itself against a real Redis, with the in-process limiter's own cases.
#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn the_redis_limiter_decides_as_the_in_process_one_does() {
    use llm_proxy::config::ClientLimits;
    use llm_proxy::policy::{Limiter, Reason};

    let redis = RedisServer::start();
    let limiter = redis_limiter(
        &redis,
        &[
            ("REDIS_TIMEOUT_MS", "100"),
            ("REDIS_FALLBACK_REPLICAS", "2"),
        ],
    )
    .await;
    let near = |actual: Duration, expected: Duration| {
        actual <= expected && actual + Duration::from_millis(500) > expected
    };

    // Five a minute: the sixth waits 12 s (less the few ms gone by).
    let five = ClientLimits {
        requests_per_minute: Some(5),
        ..ClientLimits::default()
    };
    for remaining in (0..5).rev() {
        let (charge, standing) = limiter.acquire("a", &five, 0, 0).await.unwrap();
        assert_eq!(standing.requests.unwrap().remaining, remaining);
        limiter.settle("a", &five, charge, 0, 0);
    }
    let refusal = limiter.acquire("a", &five, 0, 0).await.unwrap_err();
    assert_eq!(refusal.reason, Reason::Requests);
    assert!(
        near(refusal.retry_after, Duration::from_secs(12)),
        "{refusal:?}"
    );

    // Several limits over: the longest wait, and the refusal charges nothing.
    let both = ClientLimits {
        requests_per_minute: Some(100),
        tokens_per_minute: Some(1000),
        ..ClientLimits::default()
    };
    let (charge, _) = limiter.acquire("b", &both, 800, 0).await.unwrap();
    let refusal = limiter.acquire("b", &both, 300, 0).await.unwrap_err();
    assert_eq!(refusal.reason, Reason::Tokens);
    // 100 tokens over: 100 * 60 ms until they are free.
    assert!(
        near(refusal.retry_after, Duration::from_secs(6)),
        "{refusal:?}"
    );
    assert_eq!(refusal.standing.requests.unwrap().remaining, 99);
    // Settled at 50 tokens: the 750 refunded make room for 300 more.
    limiter.settle("b", &both, charge, 50, 0);
    assert!(
        eventually(Duration::from_secs(5), async || {
            limiter.usage("b").await.in_flight == 0
        })
        .await
    );
    let (_, standing) = limiter.acquire("b", &both, 300, 0).await.unwrap();
    let tokens = standing.tokens.unwrap().remaining;
    assert!((649..=650).contains(&tokens), "{tokens}");
    let usage = limiter.usage("b").await;
    assert_eq!(usage.tokens_today, 350);
    assert_eq!(usage.requests_last_minute, 2);
    assert_eq!(usage.tokens_last_minute, 350);
    assert_eq!(usage.in_flight, 1);

    // A frozen Redis: the decision is local (with half the limit) within the timeout.
    redis.signal("-STOP");
    let four = ClientLimits {
        requests_per_minute: Some(4),
        ..ClientLimits::default()
    };
    let started = Instant::now();
    let first = limiter.acquire("c", &four, 0, 0).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert!(first.is_ok());
    assert!(limiter.acquire("c", &four, 0, 0).await.is_ok());
    let refusal = limiter.acquire("c", &four, 0, 0).await.unwrap_err();
    assert_eq!(refusal.reason, Reason::Requests, "2 of 4 on this replica");
    redis.signal("-CONT");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_caller_that_leaves_during_its_decision_does_not_keep_the_slot() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file =
        clients_file("[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 1\n");
    let ttl = SHORT_SLOT_TTL_MS.to_string();
    // A timeout far longer than the caller waits: the decision is still in flight when it leaves.
    let proxy = replica(
        &upstream,
        &redis,
        &file,
        &[
            ("LLM_PROXY_TEST_SLOT_TTL_MS", ttl.as_str()),
            ("REDIS_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    assert_eq!(
        chat(&proxy).await.status(),
        200,
        "warm: the script is loaded"
    );
    let slots = || redis.command(&["ZCARD", "llm-proxy:{client:alice}:slots"]);
    // The warm request's slot is given back in the background: gone before the test begins.
    let settled = eventually(Duration::from_secs(3), async || slots() == ":0\r\n").await;
    assert!(settled, "the warm request settled");

    redis.signal("-STOP");
    let body = serde_json::to_string(&chat_body("gpt-mock")).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
    let reply = raw_exchange(addr, request.as_bytes(), Duration::from_millis(500)).await;
    assert!(
        !reply.closed && reply.text.is_empty(),
        "the decision was pending: {}",
        reply.text
    );
    // The caller has left (the socket is dropped); the script it sent runs once Redis thaws
    // and takes the slot in Redis, which nobody must go on refreshing.
    redis.signal("-CONT");
    let landed = eventually(Duration::from_secs(3), async || slots() == ":1\r\n").await;
    assert!(landed, "the abandoned decision took its slot in Redis");
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), async || {
            chat(&proxy).await.status() == 200
        })
        .await,
        "the abandoned slot expires"
    );
    let freed = started.elapsed();
    assert!(
        freed < Duration::from_millis(SHORT_SLOT_TTL_MS + 3000),
        "freed after {freed:?}"
    );
}

/// Script calls Redis has answered so far (`EVALSHA`, and `EVAL` for a script it had not seen).
fn script_calls(redis: &RedisServer) -> u64 {
    let stats = redis.command(&["INFO", "commandstats"]);
    ["cmdstat_evalsha:calls=", "cmdstat_eval:calls="]
        .iter()
        .filter_map(|prefix| {
            let at = stats.find(prefix)? + prefix.len();
            let digits: String = stats[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_settlement_rides_with_the_next_decision_or_follows_alone_within_the_delay() {
    use llm_proxy::config::ClientLimits;
    use llm_proxy::policy::Limiter;

    let redis = RedisServer::start();
    let limiter = redis_limiter(&redis, &[]).await;
    let limits = ClientLimits {
        requests_per_minute: Some(1000),
        tokens_per_minute: Some(1_000_000),
        max_concurrent_requests: Some(1),
        tokens_per_day: Some(1_000_000),
        ..ClientLimits::default()
    };
    // Loaded once, so that every call below is one EVALSHA.
    let (charge, _) = limiter.acquire("warm", &limits, 1, 0).await.unwrap();
    limiter.settle("warm", &limits, charge, 1, 0);
    limiter.flush().await;

    // One place only: each request is admitted because the one before gave its place back in
    // the same call, and the whole run costs one call per request plus the last settlement.
    let before = script_calls(&redis);
    for _ in 0..20 {
        let (charge, _) = limiter.acquire("alice", &limits, 100, 0).await.unwrap();
        limiter.settle("alice", &limits, charge, 30, 0);
    }
    limiter.flush().await;
    assert_eq!(script_calls(&redis) - before, 21);
    let usage = limiter.usage("alice").await;
    assert_eq!(usage.in_flight, 0);
    assert_eq!(
        usage.tokens_today,
        20 * 30,
        "every estimate replaced by the tokens used"
    );
    assert_eq!(usage.requests_last_minute, 20);

    // No next decision: the settlement goes alone once the delay has passed.
    let (charge, _) = limiter.acquire("bob", &limits, 100, 0).await.unwrap();
    limiter.settle("bob", &limits, charge, 40, 0);
    let settled = eventually(Duration::from_secs(5), async || {
        limiter.usage("bob").await.in_flight == 0
    })
    .await;
    assert!(settled, "the settlement never reached Redis");
    assert_eq!(limiter.usage("bob").await.tokens_today, 40);
}

/// `Retry-After` of a refusal, in whole seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    header(response, "retry-after").parse().unwrap()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_redis_outage_keeps_the_minute_the_clients_had_spent() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file = clients_file(
        "[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 4\n\n\
         [clients.bob]\ntoken = \"tok-bob\"\nrequests_per_minute = 4\n\n\
         [clients.carol]\ntoken = \"tok-carol\"\nrequests_per_minute = 12\n",
    );
    let extra = [("REDIS_FALLBACK_REPLICAS", "2")];
    let a = replica(&upstream, &redis, &file, &extra).await;
    let b = replica(&upstream, &redis, &file, &extra).await;
    // In shared mode, taking turns: alice spends her 4, bob 2 of his 4, carol her 12.
    for (token, count) in [("tok-alice", 4), ("tok-bob", 2), ("tok-carol", 12)] {
        for round in 0..count {
            let proxy = if round % 2 == 0 { &a } else { &b };
            assert_eq!(chat_as(proxy, token).await.status(), 200, "{token} {round}");
        }
    }

    redis.stop();
    // Carol first (her windows are the shortest): 12 a minute is 6 on each replica, one every
    // 10 s. A last saw her 11th request, B her 12th: A frees a place within 5 s, B within 10 s.
    let mut deadlines = Vec::new();
    for (proxy, most) in [(&a, 5), (&b, 10)] {
        let refused = chat_as(proxy, "tok-carol").await;
        let refused_at = Instant::now();
        assert_eq!(refused.status(), 429, "carol's minute was spent in Redis");
        let wait = retry_after(&refused);
        assert!((1..=most).contains(&wait), "Retry-After {wait}");
        assert_eq!(error_code(refused).await, "rate_limited");
        deadlines.push(refused_at + Duration::from_secs(wait));
    }
    for proxy in [&a, &b] {
        assert_eq!(readyz_limits(proxy).await, "local");
    }

    // Alice spent her whole minute: neither replica lets one more through.
    for proxy in [&a, &b] {
        let refused = chat_as(proxy, "tok-alice").await;
        assert_eq!(refused.status(), 429, "no fresh minute in the outage");
        let wait = retry_after(&refused);
        assert!((1..=30).contains(&wait), "Retry-After {wait}");
        assert_eq!(error_code(refused).await, "rate_limited");
    }

    // Bob used half: each replica has half its share (1 of 2) left, 2 in all as in Redis.
    for proxy in [&a, &b] {
        let mut statuses = Vec::new();
        for _ in 0..2 {
            statuses.push(chat_as(proxy, "tok-bob").await.status().as_u16());
        }
        assert_eq!(statuses, [200, 429], "the rest of the share, no more");
    }

    // Once Retry-After has passed, the local windows admit again, at the share's rate: one
    // request, then a refusal until the next 10 s have passed.
    for (proxy, deadline) in [&a, &b].into_iter().zip(deadlines) {
        tokio::time::sleep_until(deadline.into()).await;
        assert_eq!(chat_as(proxy, "tok-carol").await.status(), 200);
        let refused = chat_as(proxy, "tok-carol").await;
        assert_eq!(refused.status(), 429, "one place freed, not a minute");
        // The next place is 10 s on (less the moments the checks took).
        assert!(retry_after(&refused) >= 5, "{}", retry_after(&refused));
        assert_eq!(readyz_limits(proxy).await, "local");
    }
}

/// The token window and the requests in flight carry over too, at the limiter's level.
#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn an_outage_starts_the_token_window_and_the_places_where_redis_left_them() {
    use llm_proxy::config::ClientLimits;
    use llm_proxy::policy::{Limiter, Reason};

    let mut redis = RedisServer::start();
    let limiter = redis_limiter(
        &redis,
        &[
            ("REDIS_TIMEOUT_MS", "100"),
            ("REDIS_FALLBACK_REPLICAS", "2"),
        ],
    )
    .await;
    // 1000 tokens a minute, 60 ms a token: a request estimated at 600 that used 800 leaves
    // the window 48 s ahead (the settlement moved it, in a call of its own).
    let tokens = ClientLimits {
        tokens_per_minute: Some(1000),
        ..ClientLimits::default()
    };
    let (charge, _) = limiter.acquire("t", &tokens, 600, 0).await.unwrap();
    limiter.settle("t", &tokens, charge, 800, 0);
    limiter.flush().await;
    // Two places, one of them taken by a request Redis admitted that is still running.
    let places = ClientLimits {
        max_concurrent_requests: Some(2),
        ..ClientLimits::default()
    };
    let (running, _) = limiter.acquire("p", &places, 0, 0).await.unwrap();

    redis.stop();
    // 500 a minute here (120 ms a token), 48 s of it used: 100 tokens left.
    let refusal = limiter.acquire("t", &tokens, 150, 0).await.unwrap_err();
    assert_eq!(refusal.reason, Reason::Tokens);
    // 150 tokens need 18 s, 12 s are free: 6 s (less the moments gone by).
    assert!(
        refusal.retry_after <= Duration::from_secs(6)
            && refusal.retry_after > Duration::from_secs(5),
        "{refusal:?}"
    );
    assert!(limiter.acquire("t", &tokens, 90, 0).await.is_ok());

    // One place here, and the request Redis admitted on this replica holds it.
    let refusal = limiter.acquire("p", &places, 0, 0).await.unwrap_err();
    assert_eq!(refusal.reason, Reason::Concurrency);
    assert_eq!(limiter.usage("p").await.in_flight, 1);
    // When it ends, its place is free here too.
    limiter.settle("p", &places, running, 0, 0);
    assert_eq!(limiter.usage("p").await.in_flight, 0);
    let (local, _) = limiter.acquire("p", &places, 0, 0).await.unwrap();
    assert!(limiter.acquire("p", &places, 0, 0).await.is_err());
    limiter.settle("p", &places, local, 0, 0);
    assert_eq!(limiter.usage("p").await.in_flight, 0);
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_request_larger_than_a_shared_limit_is_refused_with_413_without_asking_redis() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let file = clients_file(
        "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 1000\n\n\
         [clients.bob]\ntoken = \"tok-bob\"\ntokens_per_minute = 1000\n",
    );
    let proxy = replica(&upstream, &redis, &file, &[]).await;
    let huge = serde_json::json!({"model": "gpt-mock", "max_tokens": 5000, "messages": []});
    let calls = script_calls(&redis);
    for (token, limit) in [
        ("tok-alice", "tokens_per_day"),
        ("tok-bob", "tokens_per_minute"),
    ] {
        let refused = reqwest::Client::new()
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth(token)
            .json(&huge)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 413, "{limit}");
        assert_eq!(header(&refused, "retry-after"), "", "{limit}");
        assert_eq!(header(&refused, "x-ratelimit-limit-tokens"), "", "{limit}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "request_exceeds_limit");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(&format!("this client's {limit};")),
            "{body}"
        );
    }
    // Decided from the clients file alone: Redis was not asked, so nothing is charged there.
    assert_eq!(script_calls(&redis), calls);
    assert!(upstream.requests().is_empty(), "nothing went upstream");

    // Both are admitted at once with a small request, charged in Redis as usual.
    assert_eq!(chat_as(&proxy, "tok-alice").await.status(), 200);
    assert_eq!(chat_as(&proxy, "tok-bob").await.status(), 200);
    assert!(script_calls(&redis) > calls);
    assert!(
        eventually(Duration::from_secs(5), async || {
            usage_of(&proxy, "alice").await["tokens_today"] == 13
        })
        .await,
        "only the small request is counted"
    );
}

/// Dollars carry over as the daily tokens do: each replica spends at most its share of what was
/// left, and what it spent reaches Redis once Redis answers again.
#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn an_outage_spends_each_replicas_share_of_the_dollars_left_and_redis_gets_them_back() {
    use llm_proxy::config::ClientLimits;
    use llm_proxy::policy::{Limiter, Reason};

    let mut redis = RedisServer::start();
    let limiter = redis_limiter(
        &redis,
        &[
            ("REDIS_TIMEOUT_MS", "100"),
            ("REDIS_FALLBACK_REPLICAS", "2"),
        ],
    )
    .await;
    // A tenth of a cent a day, a cent a month; 0.4 of the day spent in Redis.
    let dollars = ClientLimits {
        usd_per_day: Some(1_000_000),
        usd_per_month: Some(10_000_000),
        ..ClientLimits::default()
    };
    let (charge, _) = limiter.acquire("d", &dollars, 0, 700_000).await.unwrap();
    limiter.settle("d", &dollars, charge, 0, 400_000);
    limiter.flush().await;
    let usage = limiter.usage("d").await;
    assert_eq!((usage.usd_today, usage.usd_this_month), (400_000, 400_000));

    redis.stop();
    // Each of two replicas has half the day (500,000) less half of what was spent (200,000).
    let refusal = limiter
        .acquire("d", &dollars, 0, 300_001)
        .await
        .unwrap_err();
    assert_eq!(refusal.reason, Reason::UsdPerDay);
    let (local, _) = limiter.acquire("d", &dollars, 0, 300_000).await.unwrap();
    limiter.settle("d", &dollars, local, 0, 100_000);

    // Back (empty, as after a loss): what the outage spent is added to the day and the month.
    redis.restart();
    let reconciled = eventually(Duration::from_secs(10), async || {
        let usage = limiter.usage("d").await;
        (usage.usd_today, usage.usd_this_month) == (100_000, 100_000)
    })
    .await;
    assert!(reconciled, "{:?}", limiter.usage("d").await);
    let key = redis.command(&["HGET", "llm-proxy:{client:d}:usd", "this_month"]);
    assert!(key.contains("100000"), "{key}");
}
