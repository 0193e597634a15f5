//! The daily budget across restarts of the real binary: exact after SIGTERM, at most a second
//! lost after SIGKILL, and no start-up when it could not be kept.

use std::path::Path;
use std::time::Duration;

use mock_upstream::MockUpstream;
use serde_json::Value;

use crate::clients::{chat_body, scratch_dir};
use crate::helpers::*;
use crate::process::{RunningProxy, drain};

const BUDGET: &str = "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_day = 1000000\n";

async fn start(dir: &Path, target: &str) -> RunningProxy {
    let state = dir.join("state");
    Proxy::new()
        .envs(&[
            ("TARGET_HOST", target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("STATE_DIR", state.to_str().unwrap()),
        ])
        .clients_file(&dir.join("clients.toml"))
        .in_dir(dir)
        .start_binary()
        .await
}

async fn chats(proxy: &RunningProxy, count: usize) {
    let client = reqwest::Client::new();
    for _ in 0..count {
        let answer = client
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth("tok-alice")
            .json(&chat_body("gpt-mock"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
    }
}

async fn tokens_today(proxy: &RunningProxy) -> u64 {
    proxy.admin_usage("alice").await["tokens_today"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn the_daily_budget_survives_a_sigterm_restart_exactly() {
    let upstream = MockUpstream::start().await;
    let dir = scratch_dir("budget-term");
    std::fs::write(dir.join("clients.toml"), BUDGET).unwrap();
    let mut proxy = start(&dir, &upstream.base_url()).await;
    chats(&proxy, 3).await;
    // 7 prompt + 6 completion tokens a chat.
    assert_eq!(tokens_today(&proxy).await, 39);
    proxy.signal("-TERM");
    assert!(proxy.child.wait().await.unwrap().success());
    let log = drain(&mut proxy.log);
    assert!(
        log.contains("client=alice")
            && log.contains("model=gpt-mock prompt_tokens=7 completion_tokens=6"),
        "the access line names the model and the tokens: {log}"
    );

    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/budgets.json")).unwrap()).unwrap();
    assert_eq!(file["version"], 1);
    assert_eq!(file["tokens_today"]["alice"], 39);

    let mut proxy = start(&dir, &upstream.base_url()).await;
    assert_eq!(tokens_today(&proxy).await, 39);
    chats(&proxy, 1).await;
    assert_eq!(tokens_today(&proxy).await, 52);
    proxy.signal("-TERM");
    proxy.child.wait().await.unwrap();
}

#[tokio::test]
async fn a_sigkill_restart_loses_at_most_the_last_second() {
    let upstream = MockUpstream::start().await;
    let dir = scratch_dir("budget-kill");
    std::fs::write(dir.join("clients.toml"), BUDGET).unwrap();
    let mut proxy = start(&dir, &upstream.base_url()).await;
    chats(&proxy, 2).await;
    let last = std::time::Instant::now();
    // The counts reach the state file within a second (the writer's period), give or take the
    // write itself; from then on a SIGKILL cannot lose them.
    let state = dir.join("state/budgets.json");
    let written = |state: &Path| {
        std::fs::read(state)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .is_some_and(|file| file["tokens_today"]["alice"] == 26)
    };
    let limit = Duration::from_millis(1500).saturating_sub(last.elapsed());
    assert!(
        eventually(limit, async || written(&state)).await,
        "not written within a second"
    );
    proxy.signal("-KILL");
    proxy.child.wait().await.unwrap();

    let proxy = start(&dir, &upstream.base_url()).await;
    assert_eq!(tokens_today(&proxy).await, 26);
}

#[test]
fn a_budget_that_cannot_be_kept_stops_start_up_naming_state_dir() {
    let dir = scratch_dir("budget-unwritable");
    std::fs::write(dir.join("clients.toml"), BUDGET).unwrap();
    // A directory below a regular file cannot be created, whoever runs the test.
    std::fs::write(dir.join("not-a-dir"), "").unwrap();
    let output = Proxy::new()
        .env("AUTH_BEARER", "k")
        .clients_file(&dir.join("clients.toml"))
        .env("STATE_DIR", dir.join("not-a-dir/state").to_str().unwrap())
        .in_dir(&dir)
        .run(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("STATE_DIR"), "{stderr}");
}
