//! Where prices come from and how they reload: `PRICES_FILE` for the environment's one upstream,
//! the `[prices]` of an upstreams file, a `prices_file` in LiteLLM's format watched with them,
//! and the start-up and reload line naming the routed models that have no price.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use llm_proxy::reload::Reloader;
use mock_upstream::MockUpstream;
use serde_json::Value;

use crate::clients::{chat_body, scratch_dir};
use crate::helpers::*;
use crate::process::{drain, run_with};

const PRICED: &str =
    "[prices]\n\"gpt-4o\" = { input = 2.50, cached_input = 1.25, output = 10.00 }\n";

/// Replaces `path` by a file holding `text` in one step, as an editor or a ConfigMap does: a
/// watcher never reads it half-written.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// The price per million input tokens of `model` at `upstream` in the routing table in force,
/// in pico-dollars per token (`2.50` -> 2_500_000).
fn input_price(app: &TestApp, upstream: &str, model: &str) -> Option<u64> {
    app.state
        .router
        .table()
        .prices()
        .price(upstream, model)
        .map(|price| price.input)
}

/// A reloader of `app` reading `vars` where `main`'s reads the environment and `.env` files.
fn reloader(app: &TestApp, vars: &[(&str, &str)]) -> Reloader {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Reloader::new(app.state.reloadable(), Arc::new(move || Ok(vars.clone())))
}

#[test]
fn a_bad_prices_file_or_one_beside_an_upstreams_file_stops_start_up_naming_prices_file() {
    let dir = scratch_dir("prices-refused");
    let file = dir.join("prices.toml");
    let path = file.to_str().unwrap();
    let refused = |vars: &[(&str, &str)]| {
        let output = run_with(vars);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(output.status.code(), Some(2), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
        assert!(stderr.contains("PRICES_FILE"), "{stderr}");
        stderr
    };
    let with = [("AUTH_BEARER", "sk-env-secret"), ("PRICES_FILE", path)];

    std::fs::write(&file, "[prices]\n\"gpt-4o\" = { input = -2.5 }\n").unwrap();
    let negative = refused(&with);
    assert!(
        negative.contains(&format!(
            "PRICES_FILE: {path}: prices.gpt-4o.input: a price is US dollars per million tokens"
        )),
        "{negative}"
    );
    assert!(!negative.contains("sk-env-secret"), "{negative}");

    std::fs::write(&file, format!("{PRICED}[upstreams.a]\nmodels = [\"m\"]\n")).unwrap();
    let unknown = refused(&with);
    assert!(
        unknown.contains(&format!(
            "PRICES_FILE: {path}: upstreams: unknown field `upstreams`"
        )),
        "{unknown}"
    );

    std::fs::write(&file, "prices_file = \"/nonexistent/model_prices.json\"\n").unwrap();
    let json = refused(&with);
    assert!(
        json.contains("prices_file: /nonexistent/model_prices.json cannot be read"),
        "{json}"
    );

    let absent = dir.join("absent.toml");
    let gone = refused(&[
        ("AUTH_BEARER", "k"),
        ("PRICES_FILE", absent.to_str().unwrap()),
    ]);
    assert!(gone.contains("cannot be read"), "{gone}");

    // With an upstreams file, the prices are that file's own: two places would leave it unclear
    // which one counts.
    std::fs::write(&file, PRICED).unwrap();
    let upstreams = dir.join("upstreams.toml");
    std::fs::write(
        &upstreams,
        "default = \"a\"\n[upstreams.a]\nbase_url = \"https://a.example/v1\"\nmodels = [\"*\"]\n",
    )
    .unwrap();
    let both = refused(&[
        ("UPSTREAMS_FILE", upstreams.to_str().unwrap()),
        ("PRICES_FILE", path),
    ]);
    assert!(
        both.contains("PRICES_FILE: cannot be set together with UPSTREAMS_FILE"),
        "{both}"
    );
}

#[tokio::test]
async fn start_up_names_the_routed_models_without_a_price_or_says_spend_is_not_tracked() {
    let upstream = MockUpstream::start().await;
    let target = upstream.base_url();
    let dir = scratch_dir("prices-start");
    let file = dir.join("prices.toml");
    std::fs::write(&file, PRICED).unwrap();

    let unpriced_line = |log: &str| {
        log.lines()
            .filter(|line| {
                line.contains("prices: no price") || line.contains("prices: none configured")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    let priced = crate::process::start_binary(&[
        ("TARGET_HOST", &target),
        ("AUTH_BEARER", UPSTREAM_KEY),
        ("PRICES_FILE", file.to_str().unwrap()),
    ])
    .await;
    // The one upstream serves every model: the ones the file does not name go unpriced.
    let lines = unpriced_line(&priced.startup_log);
    assert_eq!(lines.len(), 1, "{}", priced.startup_log);
    assert!(
        lines[0].ends_with("prices: no price for default:*"),
        "{lines:?}"
    );

    let bare =
        crate::process::start_binary(&[("TARGET_HOST", &target), ("AUTH_BEARER", UPSTREAM_KEY)])
            .await;
    let lines = unpriced_line(&bare.startup_log);
    assert_eq!(lines.len(), 1, "{}", bare.startup_log);
    assert!(
        lines[0].contains("prices: none configured, spend is not tracked"),
        "{lines:?}"
    );

    // An upstreams file: each upstream's exact names, alias targets and patterns.
    let upstreams = dir.join("upstreams.toml");
    std::fs::write(
        &upstreams,
        format!(
            "default = \"openai\"\n\
             [prices]\n\"gpt-4o\" = {{ input = 2.5 }}\n\"o3*\" = {{ input = 2.0 }}\n\
             [upstreams.openai]\nbase_url = \"{target}/v1\"\n\
             models = [\"gpt-4o\", \"o3-mini\", \"gpt-4o-mini\"]\n\
             [upstreams.azure-eu]\nbase_url = \"{target}/v1\"\n\
             models = [\"gpt-4o\", \"gpt-4o-mini\"]\n\
             [upstreams.azure-eu.prices]\n\"gpt-4o-mini\" = {{ input = 0.15 }}\n\
             [upstreams.local]\nbase_url = \"{target}/v1\"\nmodels = [\"llama*\"]\n"
        ),
    )
    .unwrap();
    let routed =
        crate::process::start_binary(&[("UPSTREAMS_FILE", upstreams.to_str().unwrap())]).await;
    let lines = unpriced_line(&routed.startup_log);
    assert_eq!(lines.len(), 1, "{}", routed.startup_log);
    assert!(
        lines[0].ends_with("prices: no price for openai:gpt-4o-mini, local:llama*"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_changed_prices_file_reloads_and_a_broken_one_keeps_the_prices_in_force() {
    let dir = scratch_dir("prices-reload");
    let file = dir.join("prices.toml");
    std::fs::write(&file, PRICED).unwrap();
    let path = file.to_str().unwrap();
    let app = spawn_app(&[("PRICES_FILE", path)]).await;
    assert_eq!(input_price(&app, "default", "gpt-4o"), Some(2_500_000));
    let target = app.upstream.base_url();
    let mut reloader = reloader(
        &app,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("AUTH_VALIDATION", "true"),
            ("ALLOWED_TOKENS", CLIENT_TOKEN),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("PRICES_FILE", path),
        ],
    );

    replace(&file, &PRICED.replace("input = 2.50", "input = 2.00"));
    assert!(reloader.reload("test"));
    assert_eq!(input_price(&app, "default", "gpt-4o"), Some(2_000_000));

    // A typo anywhere rejects the whole file: the prices loaded before stay.
    replace(&file, &format!("{PRICED}\"o3\" = {{ inptu = 2.0 }}\n"));
    assert!(!reloader.reload("test"));
    assert_eq!(input_price(&app, "default", "gpt-4o"), Some(2_000_000));
    assert_eq!(input_price(&app, "default", "o3"), None);
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-4o")).await.status(),
        200,
        "still serving"
    );
}

#[tokio::test]
async fn the_prices_file_and_its_litellm_json_are_watched() {
    let dir = scratch_dir("prices-watch");
    let file = dir.join("prices.toml");
    let json = dir.join("model_prices.json");
    let litellm = |input: &str| {
        format!(
            r#"{{"claude-x": {{"input_cost_per_token": {input}, "output_cost_per_token": 1.5e-05}}}}"#
        )
    };
    std::fs::write(&json, litellm("3e-06")).unwrap();
    std::fs::write(
        &file,
        format!("prices_file = {:?}\n{PRICED}", json.display()),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let app = spawn_app(&[("PRICES_FILE", path)]).await;
    assert_eq!(input_price(&app, "default", "claude-x"), Some(3_000_000));
    let target = app.upstream.base_url();
    let reloader = reloader(
        &app,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("AUTH_VALIDATION", "true"),
            ("ALLOWED_TOKENS", CLIENT_TOKEN),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("PRICES_FILE", path),
        ],
    );
    tokio::spawn(reloader.run());

    // Only the JSON changes: the TOML naming it is the same, and still the prices reload.
    replace(&json, &litellm("4e-06"));
    let seen = eventually(Duration::from_secs(5), async || {
        input_price(&app, "default", "claude-x") == Some(4_000_000)
    })
    .await;
    assert!(seen, "a changed prices_file was not reloaded");

    replace(&file, &PRICED.replace("input = 2.50", "input = 3.00"));
    let seen = eventually(Duration::from_secs(5), async || {
        input_price(&app, "default", "gpt-4o") == Some(3_000_000)
    })
    .await;
    assert!(seen, "a changed PRICES_FILE was not reloaded");
    assert_eq!(
        input_price(&app, "default", "claude-x"),
        None,
        "the new file names no prices_file"
    );
}

#[tokio::test]
async fn a_reload_of_prices_says_again_which_models_have_none() {
    let upstream = MockUpstream::start().await;
    let dir = scratch_dir("prices-reload-log");
    let file = dir.join("prices.toml");
    let json = dir.join("model_prices.json");
    std::fs::write(&file, PRICED).unwrap();
    let mut proxy = crate::process::start_binary(&[
        ("TARGET_HOST", &upstream.base_url()),
        ("AUTH_BEARER", UPSTREAM_KEY),
        ("PRICES_FILE", file.to_str().unwrap()),
    ])
    .await;
    assert!(
        proxy.startup_log.contains("prices: no price for default:*"),
        "{}",
        proxy.startup_log
    );

    // No price left at all: that is said instead.
    replace(&file, "");
    line_with(&mut proxy, &["reloaded (upstreams or prices file changed)"]).await;
    line_with(
        &mut proxy,
        &["prices: none configured, spend is not tracked"],
    )
    .await;

    // A broken file is rejected, naming the variable, the path and the entry.
    replace(&file, "[prices]\n\"gpt-4o\" = { output = 10.0 }\n");
    let rejected = line_with(
        &mut proxy,
        &["reload (upstreams or prices file changed) rejected"],
    )
    .await;
    assert!(
        rejected.contains(&format!(
            "PRICES_FILE: {}: prices.gpt-4o: missing field `input`",
            file.display()
        )),
        "{rejected}"
    );

    // Prices again, from a LiteLLM file this time: the line is back.
    std::fs::write(&json, r#"{"gpt-4o": {"input_cost_per_token": 2.5e-06}}"#).unwrap();
    replace(&file, &format!("prices_file = {:?}\n", json.display()));
    line_with(&mut proxy, &["reloaded (upstreams or prices file changed)"]).await;
    line_with(&mut proxy, &["prices: no price for default:*"]).await;
    // SIGHUP reloads them too.
    proxy.signal("-HUP");
    line_with(&mut proxy, &["reloaded (SIGHUP)"]).await;
    line_with(&mut proxy, &["prices: no price for default:*"]).await;
}

async fn line_with(proxy: &mut RunningProxy, wanted: &[&str]) -> String {
    let found = proxy.log_line_with(wanted, Duration::from_secs(5)).await;
    found.unwrap_or_else(|| panic!("no line with {wanted:?}: {}", drain(&mut proxy.log)))
}

/// Upstream `name`'s state in `/admin/upstreams`.
async fn upstream_entry(app: &TestApp, name: &str) -> Value {
    let listed: Value = app
        .admin_get("/admin/upstreams")
        .await
        .json()
        .await
        .unwrap();
    listed["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|upstream| upstream["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no upstream {name}: {listed}"))
}

#[tokio::test]
async fn a_reload_that_changes_only_prices_keeps_every_upstream_as_it_was() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let dir = scratch_dir("prices-keep");
    std::fs::write(dir.join("a.keys"), "sk-a-1\n").unwrap();
    std::fs::write(dir.join("b.keys"), "sk-b-1\n").unwrap();
    let file = dir.join("upstreams.toml");
    let (a_url, b_url) = (a.base_url(), b.base_url());
    let text = |b_price: &str, b_weight: u32| {
        format!(
            "default = \"a\"\n\
             [prices]\n\"m\" = {{ input = 1.0 }}\n\
             [upstreams.a]\nbase_url = \"{}/v1\"\nkeys_file = {:?}\nmodels = [\"m\"]\n\
             [upstreams.b]\nbase_url = \"{}/v1\"\nkeys_file = {:?}\nmodels = [\"bm\"]\n\
             weight = {b_weight}\n\
             [upstreams.b.prices]\n\"bm\" = {{ input = {b_price} }}\n",
            a_url,
            dir.join("a.keys"),
            b_url,
            dir.join("b.keys"),
        )
    };
    std::fs::write(&file, text("0.5", 1)).unwrap();
    let upstreams = file.to_str().unwrap();
    let settings = [
        ("UPSTREAMS_FILE", upstreams),
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", CLIENT_TOKEN),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let app = Proxy::new()
        .envs(&settings)
        .owning(a)
        .start_in_process()
        .await;
    let mut reloader = reloader(&app, &settings);

    // b's one key rests for a minute after a 429: state that only the upstream built before
    // the reload holds.
    b.answer_key("sk-b-1", 429, &[("retry-after", "60")]);
    assert_eq!(app.chat(CLIENT_TOKEN, chat_body("bm")).await.status(), 429);
    assert_eq!(
        upstream_entry(&app, "b").await["keys"][0]["state"],
        "resting"
    );

    replace(&file, &text("0.75", 1));
    assert!(reloader.reload("test"));
    assert_eq!(input_price(&app, "b", "bm"), Some(750_000));
    assert_eq!(
        upstream_entry(&app, "b").await["keys"][0]["state"],
        "resting",
        "b was kept: only its prices changed"
    );

    // A change to b itself builds it again, its keys fresh: what the check above would see
    // had the price change rebuilt it.
    replace(&file, &text("0.75", 2));
    assert!(reloader.reload("test"));
    assert_eq!(
        upstream_entry(&app, "b").await["keys"][0]["state"],
        "usable"
    );
}

/// `gpt-4o` with 1000 prompt and 100 completion tokens reported, through `proxy`; the cost its
/// access line gives.
async fn priced_chat(proxy: &mut RunningProxy) -> String {
    let answer = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            proxy.port
        ))
        .bearer_auth(CLIENT_TOKEN)
        .header(
            "x-mock-usage",
            r#"{"prompt_tokens": 1000, "completion_tokens": 100}"#,
        )
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.bytes().await.unwrap();
    let line = line_with(proxy, &[" /v1/chat/completions", " cost_usd="]).await;
    line.split(" cost_usd=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string()
}

/// The price of `gpt-4o` rewritten in `file` (by `text(input price)`) while `proxy` serves:
/// 1000 x 2.50 + 100 x 10 = $0.003500 before, 1000 x 2.00 + 100 x 10 = $0.003000 on the next
/// request once the reload is logged, and still that after a rewrite that does not parse.
async fn the_next_request_costs_the_new_price(
    proxy: &mut RunningProxy,
    file: &Path,
    text: impl Fn(&str) -> String,
) {
    assert_eq!(priced_chat(proxy).await, "0.003500");

    replace(file, &text("2.00"));
    line_with(proxy, &["reloaded (upstreams or prices file changed)"]).await;
    assert_eq!(priced_chat(proxy).await, "0.003000");

    replace(
        file,
        &text("2.00").replace("output = 10.00", "output = \"ten\""),
    );
    line_with(
        proxy,
        &["reload (upstreams or prices file changed) rejected"],
    )
    .await;
    assert_eq!(priced_chat(proxy).await, "0.003000", "the old price stays");
}

#[tokio::test]
async fn a_rewritten_prices_file_prices_the_next_request_and_a_broken_one_does_not() {
    let dir = scratch_dir("prices-next-request");
    let file = dir.join("prices.toml");
    let text = |input: &str| PRICED.replace("input = 2.50", &format!("input = {input}"));
    std::fs::write(&file, text("2.50")).unwrap();
    let (_upstream, mut proxy) = crate::process::start_binary_with_mock(&[
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", CLIENT_TOKEN),
        ("PRICES_FILE", file.to_str().unwrap()),
    ])
    .await;
    the_next_request_costs_the_new_price(&mut proxy, &file, text).await;
}

#[tokio::test]
async fn a_rewritten_upstreams_file_prices_the_next_request_and_a_broken_one_does_not() {
    let upstream = MockUpstream::start().await;
    let dir = scratch_dir("upstreams-prices-next-request");
    std::fs::write(dir.join("openai.keys"), format!("{UPSTREAM_KEY}\n")).unwrap();
    let file = dir.join("upstreams.toml");
    let head = format!(
        "default = \"openai\"\n\
         [upstreams.openai]\nbase_url = \"{}/v1\"\nkeys_file = {:?}\nmodels = [\"gpt-4o\"]\n",
        upstream.base_url(),
        dir.join("openai.keys"),
    );
    let text = |input: &str| {
        format!(
            "{head}{}",
            PRICED.replace("input = 2.50", &format!("input = {input}"))
        )
    };
    std::fs::write(&file, text("2.50")).unwrap();
    let mut proxy = crate::process::start_binary(&[
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", CLIENT_TOKEN),
        ("UPSTREAMS_FILE", file.to_str().unwrap()),
    ])
    .await;
    the_next_request_costs_the_new_price(&mut proxy, &file, text).await;
}
