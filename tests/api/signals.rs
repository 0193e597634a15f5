//! `REDIS_URL`: key rests and breaker openings told to the other replicas through Redis pub/sub
//! within a round trip, and the state read by a replica that starts or reconnects. A real
//! `redis-server`; for the key rests, two real processes of the binary in front of one mock
//! upstream, whose request log is the evidence.

use std::time::{Duration, Instant};

use llm_proxy::ops::metrics::Metrics;
use llm_proxy::shared::Shared;
use llm_proxy::shared::rests::rest_key;
use llm_proxy::shared::signals::{BREAKER_PREFIX, CHANNEL, Signal, Signals};
use mock_upstream::MockUpstream;
use tokio::sync::broadcast;

use crate::helpers::*;
use crate::redis_server::RedisServer;

const KEY_1: &str = "sk-signal-key-number-one";
const KEY_2: &str = "sk-signal-key-number-two";
/// What the issue asks: a rest or an opening on one replica is honoured by another within this.
const WITHIN: Duration = Duration::from_millis(100);

/// A replica's handles (its own metrics, shared-state handle and signals) on `redis`.
async fn handle(redis: &RedisServer) -> (Signals, Metrics) {
    let url = redis.url();
    let config = config_from(&[("AUTH_BEARER", "k"), ("REDIS_URL", url.as_str())]);
    let metrics = Metrics::new();
    let shared = Shared::new(&config.shared, metrics.clone());
    (Signals::new(&shared), metrics)
}

async fn caught_up(signals: &Signals) {
    tokio::time::timeout(Duration::from_secs(5), signals.caught_up())
        .await
        .expect("the subscriber connects and reads the state");
}

async fn next(heard: &mut broadcast::Receiver<Signal>) -> Signal {
    tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .expect("a signal within 5 s")
        .expect("the channel is open")
}

fn ttl(redis: &RedisServer, name: &str) -> i64 {
    redis
        .command(&["PTTL", name])
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_breaker_opening_reaches_another_replica_within_100_ms_and_a_late_one_on_start() {
    let redis = RedisServer::start();
    let (a, a_metrics) = handle(&redis).await;
    let (b, _) = handle(&redis).await;
    caught_up(&a).await;
    caught_up(&b).await;
    let mut heard_by_a = a.subscribe();
    let mut heard_by_b = b.subscribe();

    let opened = Signal::BreakerOpened {
        upstream: "azure-eu".to_string(),
        remaining: Duration::from_secs(10),
        reopenings: 1,
    };
    let started = Instant::now();
    a.publish(&opened).await.expect("Redis answers");
    let heard = next(&mut heard_by_b).await;
    let took = started.elapsed();
    assert_eq!(heard, opened);
    assert!(took < WITHIN, "B heard it after {took:?}");
    let opening = b.last_opening("azure-eu").expect("B keeps what it heard");
    assert_eq!(opening.reopenings, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), heard_by_a.recv())
            .await
            .is_err(),
        "A skips its own message"
    );

    let name = format!("{BREAKER_PREFIX}azure-eu");
    assert_eq!(redis.command(&["GET", &name]).lines().nth(1), Some("1"));
    let left = ttl(&redis, &name);
    assert!(
        left > 9_000 && left <= 10_000,
        "expires with the opening: {left}"
    );

    // A replica that starts later reads the opening (and a rest already in Redis) first.
    let resting = rest_key(KEY_1);
    redis.command(&["SET", &resting, "1", "PX", "30000"]);
    let (c, _) = handle(&redis).await;
    let names: std::sync::Arc<[String]> = vec![resting.clone(), rest_key(KEY_2)].into();
    c.track_rests(&names);
    let mut heard_by_c = c.subscribe();
    let mut heard = vec![next(&mut heard_by_c).await, next(&mut heard_by_c).await];
    heard.sort_by_key(|signal| matches!(signal, Signal::KeyRest { .. }));
    let Signal::BreakerOpened {
        upstream,
        remaining,
        reopenings,
    } = &heard[0]
    else {
        panic!("{heard:?}");
    };
    assert_eq!((upstream.as_str(), *reopenings), ("azure-eu", 1));
    assert!(
        *remaining > Duration::from_secs(5) && *remaining <= Duration::from_secs(10),
        "{remaining:?}"
    );
    let Signal::KeyRest { key, remaining } = &heard[1] else {
        panic!("{heard:?}");
    };
    assert_eq!(key, &resting, "only the resting key of the pool");
    assert!(
        *remaining > Duration::from_secs(25) && *remaining <= Duration::from_secs(30),
        "{remaining:?}"
    );

    // The subscriber's PINGs (every second) keep a live connection: nothing dropped.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = a_metrics.encode();
    assert!(!text.contains("llm_proxy_redis_failures_total{"), "{text}");
    assert_eq!(
        redis.command(&["PUBSUB", "NUMSUB", CHANNEL]).lines().last(),
        Some(":3"),
        "one subscriber connection per replica"
    );
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_replica_whose_subscriber_dropped_reads_what_it_missed_when_it_reconnects() {
    let redis = RedisServer::start();
    let (a, _) = handle(&redis).await;
    let (b, b_metrics) = handle(&redis).await;
    caught_up(&a).await;
    caught_up(&b).await;
    let mut heard_by_b = b.subscribe();

    // Only the subscriber connections: A's shared connection still publishes.
    assert!(
        redis
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .starts_with(":2"),
        "two subscribers, one per replica"
    );
    let sent = Duration::from_secs(10);
    a.publish(&Signal::BreakerOpened {
        upstream: "openai".to_string(),
        remaining: sent,
        reopenings: 0,
    })
    .await
    .expect("Redis answers");

    let Signal::BreakerOpened {
        upstream,
        remaining,
        ..
    } = next(&mut heard_by_b).await
    else {
        panic!("a breaker opening");
    };
    assert_eq!(upstream, "openai");
    // The message carries the whole 10 s; the state read after the reconnect (which waits at
    // least 100 ms) carries what was left.
    assert!(
        remaining < sent - Duration::from_millis(50),
        "read from the state, not the message: {remaining:?}"
    );
    assert!(
        b_metrics
            .encode()
            .contains(r#"llm_proxy_redis_failures_total{kind="connection"} 1"#),
        "the drop is counted once:\n{}",
        b_metrics.encode()
    );
}

async fn replica(upstream: &MockUpstream, redis: &RedisServer) -> RunningProxy {
    Proxy::new()
        .env("TARGET_HOST", upstream.base_url())
        .env("AUTH_BEARER", format!("{KEY_1},{KEY_2}"))
        .env("REDIS_URL", redis.url())
        // The merge every minute: a rest heard within 100 ms came as a signal.
        .env("LLM_PROXY_TEST_REST_SYNC_MS", "60000")
        .start_binary()
        .await
}

async fn chat(proxy: &RunningProxy) -> u16 {
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "gpt-mock", "messages": []}))
        .send()
        .await
        .expect("the replica answers");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

/// One series of the replica's `/metrics`, e.g. `llm_proxy_upstream_key_resting{key="1"}`.
async fn metric(client: &reqwest::Client, proxy: &RunningProxy, series: &str) -> Option<f64> {
    let text = client
        .get(proxy.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn keys_seen(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|request| request.key().unwrap_or("<none>").to_string())
        .collect()
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (Debian package redis-server)"
)]
async fn a_key_rested_on_one_replica_is_skipped_by_the_other_within_100_ms() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let a = replica(&upstream, &redis).await;
    let b = replica(&upstream, &redis).await;
    let subscribers = eventually(Duration::from_secs(5), async || {
        redis
            .command(&["PUBSUB", "NUMSUB", CHANNEL])
            .ends_with(":2\r\n")
    })
    .await;
    assert!(subscribers, "both replicas listen");

    let client = reqwest::Client::new();
    let resting = r#"llm_proxy_upstream_key_resting{key="1"}"#;
    assert_eq!(metric(&client, &b, resting).await, Some(0.0));
    upstream.answer_key(KEY_1, 429, &[("retry-after", "30")]);
    // Taken before A's request: A's 429 comes later, so this overstates the time since it.
    let started = Instant::now();
    assert_eq!(chat(&a).await, 200);
    assert_eq!(keys_seen(&upstream), [KEY_1, KEY_2], "A rested key 1");
    let heard = eventually(Duration::from_secs(5), async || {
        metric(&client, &b, resting).await == Some(1.0)
    })
    .await;
    let took = started.elapsed();
    assert!(heard, "B sees key 1 resting");
    assert!(took < WITHIN, "B saw the rest {took:?} after A's request");

    assert_eq!(chat(&b).await, 200);
    assert_eq!(
        keys_seen(&upstream)[2..],
        [KEY_2],
        "B's next request went to key 2, though its turn starts at key 1"
    );
    assert_eq!(
        metric(
            &client,
            &b,
            r#"llm_proxy_upstream_key_rate_limited_total{key="1"}"#
        )
        .await,
        None,
        "B never got a 429 itself, so it did not merge after one"
    );
}
