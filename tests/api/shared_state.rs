//! `REDIS_URL`: key rests shared by replicas through a real `redis-server`, the fall back to
//! local state when Redis stops or freezes, and the way back. Two replicas are two real
//! processes of the binary in front of one mock upstream; what the mock saw is the evidence.

use std::time::{Duration, Instant};

use llm_proxy::ops::metrics::Metrics;
use llm_proxy::shared::rests::SharedRests;
use llm_proxy::shared::{Mode, Shared, Unavailable};
use mock_upstream::MockUpstream;

use crate::helpers::*;
use crate::process::{run_with, start_binary};
use crate::redis_server::RedisServer;

const KEY_1: &str = "sk-shared-key-number-one";
const KEY_2: &str = "sk-shared-key-number-two";
const KEY_3: &str = "sk-shared-key-number-three";
/// Long enough for a loaded test machine, short enough to show the bound.
const TIMEOUT_MS: u64 = 250;

async fn replica(upstream: &MockUpstream, redis: &RedisServer, keys: &str) -> RunningProxy {
    Proxy::new()
        .env("TARGET_HOST", upstream.base_url())
        .env("AUTH_BEARER", keys)
        .env("REDIS_URL", redis.url())
        .env("REDIS_TIMEOUT_MS", TIMEOUT_MS.to_string())
        .start_binary()
        .await
}

async fn chat(proxy: &RunningProxy) -> (u16, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "gpt-mock", "messages": []}))
        .send()
        .await
        .expect("the replica answers");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    (status, started.elapsed())
}

async fn readyz(proxy: &RunningProxy) -> (u16, serde_json::Value) {
    let response = reqwest::get(proxy.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// One series of the replica's `/metrics`, e.g. `llm_proxy_upstream_key_resting{key="1"}`.
async fn metric(proxy: &RunningProxy, series: &str) -> Option<f64> {
    let text = reqwest::get(proxy.url("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/readyz` until its body says `limits` is `mode`.
async fn wait_for_mode(proxy: &RunningProxy, mode: &str, limit: Duration) -> bool {
    eventually(limit, async || readyz(proxy).await.1["limits"] == mode).await
}

/// Polls `/metrics` until `series` has `value`; returns how long that took.
async fn wait_for_metric(
    proxy: &RunningProxy,
    series: &str,
    value: f64,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let reached = eventually(limit, async || metric(proxy, series).await == Some(value)).await;
    reached.then(|| started.elapsed())
}

fn keys_seen(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|request| request.key().unwrap_or("<none>").to_string())
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_key_rested_on_one_replica_is_not_used_by_the_other() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let keys = format!("{KEY_1},{KEY_2}");
    let a = replica(&upstream, &redis, &keys).await;
    let b = replica(&upstream, &redis, &keys).await;
    for proxy in [&a, &b] {
        assert!(proxy.startup_log.contains("shared state mode: shared"));
        assert_eq!(
            readyz(proxy).await,
            (
                200,
                serde_json::json!({"status": "ready", "limits": "shared"})
            )
        );
    }

    upstream.answer_key(KEY_1, 429, &[("retry-after", "30")]);
    assert_eq!(chat(&a).await.0, 200);
    assert_eq!(
        keys_seen(&upstream),
        [KEY_1, KEY_2],
        "replica A rested key 1"
    );

    // B hears of the rest within the sync interval (0.5 s) and two round trips.
    let heard = wait_for_metric(
        &b,
        r#"llm_proxy_upstream_key_resting{key="1"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await
    .expect("replica B sees key 1 resting");
    assert!(heard < Duration::from_secs(3), "took {heard:?}");
    for _ in 0..4 {
        assert_eq!(chat(&b).await.0, 200);
    }
    assert_eq!(
        keys_seen(&upstream)[2..],
        [KEY_2, KEY_2, KEY_2, KEY_2],
        "B never asked with the key A saw rate-limited"
    );
    assert_eq!(
        metric(&b, r#"llm_proxy_upstream_key_rate_limited_total{key="1"}"#).await,
        None,
        "B itself never got a 429"
    );

    let names = redis.command(&["KEYS", "llm-proxy:*"]);
    assert!(names.contains("llm-proxy:{keys}:rest:"), "{names}");
    assert_eq!(names.matches("llm-proxy:").count(), 1, "{names}");
    let name = names
        .lines()
        .find(|line| line.starts_with("llm-proxy:"))
        .unwrap();
    let ttl: i64 = redis
        .command(&["PTTL", name])
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(
        ttl > 20_000 && ttl <= 30_000,
        "expires with the rest: {ttl}"
    );
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn when_redis_stops_the_replicas_go_local_and_come_back_when_it_is_back() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let keys = format!("{KEY_1},{KEY_2},{KEY_3}");
    let mut a = replica(&upstream, &redis, &keys).await;
    let b = replica(&upstream, &redis, &keys).await;
    let mut slowest_before = Duration::ZERO;
    for _ in 0..3 {
        let (status, took) = chat(&a).await;
        assert_eq!(status, 200);
        slowest_before = slowest_before.max(took);
    }

    redis.stop();
    upstream.answer_key(KEY_1, 429, &[("retry-after", "60")]);
    // No request waits for Redis longer than the timeout: these do not wait for it at all.
    let bound = slowest_before + Duration::from_millis(TIMEOUT_MS + 300);
    for _ in 0..10 {
        let (status, took) = chat(&a).await;
        assert_eq!(status, 200);
        assert!(took < bound, "a request took {took:?} with Redis down");
    }
    for proxy in [&a, &b] {
        assert!(
            wait_for_mode(proxy, "local", Duration::from_secs(5)).await,
            "the replica notices Redis is gone"
        );
        assert_eq!(
            readyz(proxy).await,
            (
                200,
                serde_json::json!({"status": "ready", "limits": "local"})
            ),
            "still ready: it serves with local state"
        );
        assert_eq!(
            metric(proxy, r#"llm_proxy_shared_state_mode{mode="local"}"#).await,
            Some(1.0)
        );
        assert_eq!(
            metric(proxy, r#"llm_proxy_shared_state_mode{mode="shared"}"#).await,
            Some(0.0)
        );
    }
    let (status, took) = chat(&a).await;
    assert_eq!(status, 200);
    assert!(took < bound, "in local mode: {took:?}");

    redis.restart();
    for proxy in [&a, &b] {
        assert!(
            wait_for_mode(proxy, "shared", Duration::from_secs(5)).await,
            "the replica is back on Redis within a few seconds"
        );
    }
    // The rest A recorded during the outage reaches Redis, and B, once it is back.
    wait_for_metric(
        &b,
        r#"llm_proxy_upstream_key_resting{key="1"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await
    .expect("replica B hears of the rest recorded during the outage");
    let before_b = upstream.requests().len();
    for _ in 0..4 {
        assert_eq!(chat(&b).await.0, 200);
    }
    let from_b = &keys_seen(&upstream)[before_b..];
    assert!(!from_b.iter().any(|key| key == KEY_1), "{from_b:?}");

    a.terminate();
    let _ = a.child.wait().await;
    let log = drain(&mut a.log);
    assert_eq!(
        count(&log, "shared state mode: local"),
        1,
        "one line per change:\n{log}"
    );
    assert_eq!(count(&log, "shared state mode: shared"), 1, "{log}");
    assert!(log.contains("answers again"), "{log}");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_frozen_redis_costs_a_call_the_timeout_once_then_nothing_until_it_answers() {
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_from(&[
        ("AUTH_BEARER", "k"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_TIMEOUT_MS", "100"),
    ]);
    let metrics = Metrics::new();
    let shared = Shared::new(&config.shared, metrics.clone());
    shared.first_contact().await;
    assert_eq!(shared.mode(), Mode::Shared);
    let script = redis::Script::new(
        "local n = redis.call('INCR', KEYS[1]) redis.call('PEXPIRE', KEYS[1], 60000) return n",
    );
    let mut invocation = script.prepare_invoke();
    invocation.key("llm-proxy:{test}:count");
    assert_eq!(shared.eval::<i64>(&invocation).await, Ok(1));
    assert_eq!(shared.eval::<i64>(&invocation).await, Ok(2));

    redis.signal("-STOP");
    let started = Instant::now();
    assert_eq!(shared.eval::<i64>(&invocation).await, Err(Unavailable));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_millis(400),
        "the timeout bounds the call: {took:?}"
    );
    assert_eq!(shared.mode(), Mode::Local);
    let started = Instant::now();
    assert_eq!(shared.eval::<i64>(&invocation).await, Err(Unavailable));
    assert!(
        started.elapsed() < Duration::from_millis(20),
        "local mode asks no one"
    );
    let text = metrics.encode();
    assert!(
        text.contains(r#"llm_proxy_redis_failures_total{kind="timeout"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"llm_proxy_shared_state_mode{mode="local"} 1"#));

    redis.signal("-CONT");
    assert!(
        eventually(Duration::from_secs(5), async || shared.mode()
            == Mode::Shared)
        .await,
        "the probe brings it back"
    );
    // 4, not 3: the call that timed out was still in Redis's socket and ran once it thawed.
    // A timeout means "no answer", not "not applied"; the limiter's scripts must allow for it.
    assert_eq!(shared.eval::<i64>(&invocation).await, Ok(4));
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn the_merge_keeps_the_longer_rest_and_every_key_expires() {
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_from(&[
        ("AUTH_BEARER", "k1-aaaaaaaa,k2-bbbbbbbb"),
        ("REDIS_URL", url.as_str()),
    ]);
    let shared = Shared::new(&config.shared, Metrics::new());
    shared.first_contact().await;
    let rests = SharedRests::new(shared, &config.upstream.keys);
    let secs = Duration::from_secs;
    let theirs = rests.merge(&[secs(30), Duration::ZERO]).await.unwrap();
    assert!(theirs[0] > secs(29) && theirs[0] <= secs(30), "{theirs:?}");
    assert_eq!(theirs[1], Duration::ZERO);
    let theirs = rests.merge(&[secs(10), secs(5)]).await.unwrap();
    assert!(
        theirs[0] > secs(29),
        "a shorter rest does not cut a longer one: {theirs:?}"
    );
    assert!(theirs[1] > secs(4) && theirs[1] <= secs(5), "{theirs:?}");
    let names = redis.command(&["KEYS", "*"]);
    let names: Vec<&str> = names
        .lines()
        .filter(|line| line.starts_with("llm-proxy:"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for name in names {
        assert!(name.starts_with("llm-proxy:{keys}:rest:"), "{name}");
        assert!(!name.contains("aaaa") && !name.contains("bbbb"), "{name}");
        let ttl = redis.command(&["PTTL", name]);
        assert!(
            ttl.starts_with(':') && !ttl.starts_with(":-"),
            "{name}: {ttl}"
        );
    }
}

#[tokio::test]
async fn without_redis_url_the_state_is_local_and_readyz_says_so() {
    let app = spawn_app(&[]).await;
    let ready: serde_json::Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"status": "ready", "limits": "local"})
    );
    let text = app.metrics_text().await;
    assert!(
        text.contains(r#"llm_proxy_shared_state_mode{mode="local"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"llm_proxy_shared_state_mode{mode="shared"} 0"#));
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_bad_redis_url_stops_start_up_and_its_password_is_never_shown() {
    let output = run_with(&[
        ("AUTH_BEARER", "k"),
        ("REDIS_URL", "http://:hunter2@h:6379"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // A password Redis does not expect: the replica starts in local mode and says why, masked.
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let target = upstream.base_url();
    let url = format!("redis://:hunter2-pass@127.0.0.1:{}/0", redis.port);
    let mut proxy = start_binary(&[
        ("TARGET_HOST", target.as_str()),
        ("AUTH_BEARER", UPSTREAM_KEY),
        ("REDIS_URL", url.as_str()),
        ("LOG_LEVEL", "debug"),
        ("DEBUG_MODE", "true"),
    ])
    .await;
    assert!(
        proxy.startup_log.contains("shared state mode: local"),
        "{}",
        proxy.startup_log
    );
    assert!(
        proxy.startup_log.contains("redis://:***@127.0.0.1"),
        "{}",
        proxy.startup_log
    );
    assert_eq!(readyz(&proxy).await.1["limits"], "local");
    proxy.terminate();
    let _ = proxy.child.wait().await;
    let log = format!("{}{}", proxy.startup_log, drain(&mut proxy.log));
    assert!(!log.contains("hunter2"), "{log}");
}
