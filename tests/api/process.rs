//! The real binary: configuration errors, signals and what ends up in its logs.

use std::time::Duration;

use futures::StreamExt;
use mock_upstream::MockUpstream;

use crate::helpers::*;

// The harness that starts the binary lives with the other helpers; these names stay here too.
pub use crate::helpers::{RunningProxy, drain};

/// Runs the binary in an empty directory (no `.env` files) with only `vars` set.
pub fn run_with(vars: &[(&str, &str)]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("llm-proxy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Proxy::new().envs(vars).in_dir(&dir).run(&[])
}

#[test]
fn bad_configuration_stops_start_up_naming_the_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "AUTH_BEARER"),
        (
            &[("AUTH_BEARER", "k"), ("PROXY_PORT", "eighty")],
            "PROXY_PORT",
        ),
        (
            &[("AUTH_BEARER", "k"), ("TARGET_HOST", "not a url")],
            "TARGET_HOST",
        ),
        (
            &[("AUTH_BEARER", "k"), ("AUTH_VALIDATION", "true")],
            "ALLOWED_TOKENS",
        ),
        (
            &[("AUTH_BEARER", "k"), ("LOG_LEVEL", "verbose")],
            "LOG_LEVEL",
        ),
    ];
    for (vars, variable) in cases {
        let output = run_with(vars);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{vars:?} must not start");
        assert!(stderr.contains(variable), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
    }
}

#[test]
fn env_files_are_read_and_the_environment_wins() {
    let dir = std::env::temp_dir().join(format!("llm-proxy-dotenv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        "AUTH_BEARER=k\nPROXY_PORT=1\nLOG_LEVEL=info\n",
    )
    .unwrap();
    std::fs::write(dir.join(".env.local"), "PROXY_PORT=eighty\n").unwrap();
    let run = |vars: &[(&str, &str)]| Proxy::new().envs(vars).in_dir(&dir).run(&[]);
    let output = run(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("PROXY_PORT"),
        ".env.local overrides .env: {stderr}"
    );

    let output = run(&[("LOG_LEVEL", "verbose"), ("PROXY_PORT", "0")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LOG_LEVEL"),
        "the environment overrides both files: {stderr}"
    );
}

#[test]
fn log_format_in_a_dotenv_file_shapes_the_start_up_error_and_healthcheck() {
    let dir = std::env::temp_dir().join(format!("llm-proxy-dotenv-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        "LOG_FORMAT=json\nAUTH_BEARER=sk-in-dotenv\nPROXY_PORT=eighty\n",
    )
    .unwrap();
    let run = |args: &[&str]| Proxy::new().in_dir(&dir).run(args);

    let failed = run(&[]);
    assert_eq!(failed.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_slice(&failed.stderr).unwrap_or_else(|_| {
        panic!(
            "not one JSON line: {}",
            String::from_utf8_lossy(&failed.stderr)
        )
    });
    assert_eq!(line["variable"], "PROXY_PORT");
    assert_eq!(line["level"], "ERROR");
    assert!(!line.to_string().contains("sk-in-dotenv"), "{line}");

    let healthcheck = run(&["healthcheck"]);
    assert!(!healthcheck.status.success());
    let line: serde_json::Value =
        serde_json::from_slice(&healthcheck.stderr).unwrap_or_else(|_| {
            panic!(
                "not one JSON line: {}",
                String::from_utf8_lossy(&healthcheck.stderr)
            )
        });
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|message| message.contains("PROXY_PORT")),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The binary in front of a fresh mock upstream with the test key, `extra` on top; the mock
/// comes back too, for the test to see what reached it.
pub async fn start_binary_with_mock(extra: &[(&str, &str)]) -> (MockUpstream, RunningProxy) {
    let upstream = MockUpstream::start().await;
    let target = upstream.base_url();
    let mut vars = vec![
        ("TARGET_HOST", target.as_str()),
        ("AUTH_BEARER", UPSTREAM_KEY),
    ];
    vars.extend_from_slice(extra);
    let proxy = start_binary(&vars).await;
    (upstream, proxy)
}

/// The binary on an ephemeral port with only `vars` set, its log lines collected.
pub async fn start_binary(vars: &[(&str, &str)]) -> RunningProxy {
    Proxy::new().envs(vars).start_binary().await
}

/// The binary with only `vars` set, run in `dir` (where it reads `.env` files), once it listens.
pub async fn start_binary_in(dir: &std::path::Path, vars: &[(&str, &str)]) -> RunningProxy {
    Proxy::new().envs(vars).in_dir(dir).start_binary().await
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_then_exits_zero() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[]).await;
    let response = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            proxy.port
        ))
        .header("x-mock-chunks", "10")
        .header("x-mock-interval-ms", "100")
        .json(&serde_json::json!({"stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut all = body.next().await.unwrap().unwrap().to_vec();

    proxy.terminate();

    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk.expect("stream cut by SIGTERM"));
    }
    assert!(all.ends_with(b"data: [DONE]\n\n"));
    let status = tokio::time::timeout(Duration::from_secs(5), proxy.child.wait())
        .await
        .expect("the proxy exits after draining")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let log = drain(&mut proxy.log);
    assert!(log.contains("SIGTERM"), "{log}");
}

#[tokio::test]
async fn no_secret_reaches_the_logs_even_in_debug_mode() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", CLIENT_TOKEN),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("LOG_LEVEL", "debug"),
        ("DEBUG_MODE", "true"),
        // Some providers take their key as a query parameter.
        ("UPSTREAM_QUERY", "key=query-secret-value"),
    ])
    .await;
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let client = reqwest::Client::new();
    let chat = |stream: bool| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(CLIENT_TOKEN)
            .header("x-api-key", UPSTREAM_KEY)
            .json(&serde_json::json!({"stream": stream, "note": CLIENT_TOKEN}))
            .send()
    };
    assert_eq!(chat(false).await.unwrap().status(), 200);
    let streamed = chat(true).await.unwrap().text().await.unwrap();
    assert!(streamed.contains("[DONE]"));
    let models = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(CLIENT_TOKEN)
        .send();
    assert_eq!(models.await.unwrap().status(), 200);
    let wrong = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(ADMIN_TOKEN)
        .send();
    assert_eq!(wrong.await.unwrap().status(), 401);
    let clear = client
        .post(format!("{base}/admin/cache/clear"))
        .bearer_auth(ADMIN_TOKEN)
        .send();
    assert_eq!(clear.await.unwrap().status(), 200);

    tokio::time::sleep(Duration::from_millis(200)).await;
    // The start-up lines too: the configuration is logged there.
    let log = format!("{}{}", proxy.startup_log, drain(&mut proxy.log));
    assert!(log.contains("configuration: "), "{log}");
    assert!(
        log.contains("request body chunk"),
        "debug mode logs bodies: {log}"
    );
    assert!(
        log.contains("POST /v1/chat/completions status=200"),
        "access lines: {log}"
    );
    for secret in [
        UPSTREAM_KEY,
        CLIENT_TOKEN,
        ADMIN_TOKEN,
        "query-secret-value",
    ] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn every_log_line_is_json_with_log_format_json() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", "alice:tok-alice"),
        ("LOG_FORMAT", "json"),
    ])
    .await;
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let client = reqwest::Client::new();
    let chat = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .header("x-request-id", "json-test-1")
        .json(&serde_json::json!({"stream": true}))
        .send()
        .await
        .unwrap();
    assert!(chat.text().await.unwrap().ends_with("[DONE]\n\n"));
    let rejected = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 401);

    proxy.terminate();
    proxy.child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = drain(&mut proxy.log);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(lines.len() >= 5, "{log}");
    for line in &lines {
        assert!(
            line["time"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["target"] == "access")
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    let stream = access[0];
    assert_eq!(stream["request_id"], "json-test-1");
    assert_eq!(stream["client"], "alice");
    assert_eq!(stream["status"], 200);
    assert_eq!(stream["stream"], true);
    assert_eq!(stream["upstream_request_id"], "req_mock_stream");
    assert_eq!(stream["outcome"], "complete");
    assert!(stream["bytes_in"].as_u64().unwrap() > 0 && stream["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(access[1]["status"], 401);

    let failed = run_with(&[("LOG_FORMAT", "json")]);
    let line: serde_json::Value = serde_json::from_slice(&failed.stderr).expect("JSON error line");
    assert_eq!(line["variable"], "AUTH_BEARER");
}

/// An upstreams file with two upstreams in `dir`, the default one in front of `base` with its
/// keys in a keys file, `extra` added to the second's table.
fn upstreams_file(dir: &std::path::Path, base: &str, extra: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let keys = dir.join("primary-keys");
    std::fs::write(&keys, format!("# the team key\n{UPSTREAM_KEY}\n")).unwrap();
    let file = dir.join("upstreams.toml");
    std::fs::write(
        &file,
        format!(
            "default = \"primary\"\n\
             [upstreams.primary]\nbase_url = \"{base}/v1\"\nkeys_file = \"{}\"\nmodels = [\"*\"]\n\
             [upstreams.azure-eu]\nbase_url = \"https://eu.example/openai/v1\"\n\
             keys_env = \"AZURE_EU_KEYS\"\nmodels = [\"gpt-4o\"]\n{extra}\n",
            keys.display()
        ),
    )
    .unwrap();
    file.to_str().unwrap().to_string()
}

#[test]
fn an_upstreams_file_refuses_auth_bearer_and_names_a_broken_upstreams_field() {
    let dir = std::env::temp_dir().join(format!("llm-proxy-upstreams-{}", std::process::id()));
    let file = upstreams_file(&dir, "http://127.0.0.1:9", "");
    let refused = |vars: &[(&str, &str)]| {
        let output = run_with(vars);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(output.status.code(), Some(2), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
        stderr
    };

    let both = refused(&[
        ("UPSTREAMS_FILE", &file),
        ("AZURE_EU_KEYS", "sk-eu"),
        ("AUTH_BEARER", "sk-env-secret"),
    ]);
    assert!(
        both.contains("UPSTREAMS_FILE") && both.contains("AUTH_BEARER"),
        "{both}"
    );
    assert!(!both.contains("sk-env-secret"), "{both}");

    let file = upstreams_file(&dir, "http://127.0.0.1:9", "weight = 0");
    let broken = refused(&[("UPSTREAMS_FILE", &file), ("AZURE_EU_KEYS", "sk-eu")]);
    assert!(
        broken.contains("UPSTREAMS_FILE")
            && broken.contains("upstreams.azure-eu.weight: must be a whole number of at least 1"),
        "{broken}"
    );

    let file = upstreams_file(&dir, "http://127.0.0.1:9", "");
    let keyless = refused(&[("UPSTREAMS_FILE", &file)]);
    assert!(
        keyless.contains("upstreams.azure-eu.keys_env: AZURE_EU_KEYS is not set"),
        "{keyless}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn with_an_upstreams_file_requests_go_to_the_default_upstream_with_its_keys() {
    let upstream = MockUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("llm-proxy-upstreams-ok-{}", std::process::id()));
    let file = upstreams_file(&dir, &upstream.base_url(), "");
    let proxy = start_binary(&[("UPSTREAMS_FILE", &file), ("AZURE_EU_KEYS", "sk-eu")]).await;
    let response = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            proxy.port
        ))
        .json(&serde_json::json!({"model": "gpt-4o-mini"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream
        .last_request()
        .expect("the request reached the upstream");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.key(), Some(UPSTREAM_KEY), "the keys file's key");
    std::fs::remove_dir_all(&dir).unwrap();
}
