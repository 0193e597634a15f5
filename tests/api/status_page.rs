//! The status page over HTTP: where it is served and with which headers, its assets' tags, and
//! the data it reads that exists for it (`/admin/activity`, the clients' state and refusals of
//! the last hour), in this process and shared through Redis. The page itself, in a browser, is
//! `browser.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::clients::{chat_body, scratch_dir, spawn_with_clients};
use crate::helpers::*;
use crate::redis_server::RedisServer;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn assert_protected(response: &reqwest::Response) {
    assert_eq!(header(response, "content-security-policy"), CSP);
    assert_eq!(header(response, "x-content-type-options"), "nosniff");
    assert_eq!(header(response, "referrer-policy"), "no-referrer");
    assert_eq!(header(response, "x-frame-options"), "DENY");
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_token_with_strict_headers() {
    let app = spawn_app(&[]).await;
    let page = app.client.get(app.url("/admin/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_protected(&page);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    let text = page.text().await.unwrap();
    assert!(
        text.contains("<script type=\"module\" src=\"app.js\">"),
        "{text}"
    );
    assert!(text.contains("<link rel=\"stylesheet\" href=\"app.css\">"));
    assert!(
        text.contains("<meta name=\"auth-header\" content=\"authorization\">"),
        "the header the token goes in"
    );
    for secret in [ADMIN_TOKEN, CLIENT_TOKEN, UPSTREAM_KEY] {
        assert!(!text.contains(secret));
    }

    for (path, content_type, sample) in [
        (
            "/admin/app.css",
            "text/css; charset=utf-8",
            "prefers-color-scheme",
        ),
        (
            "/admin/app.js",
            "text/javascript; charset=utf-8",
            "sessionStorage",
        ),
    ] {
        let asset = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert_protected(&asset);
        assert_eq!(header(&asset, "content-type"), content_type);
        assert_eq!(header(&asset, "cache-control"), "no-cache");
        let tag = header(&asset, "etag").to_string();
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() == 18,
            "{tag}"
        );
        assert!(asset.text().await.unwrap().contains(sample));

        for matching in [tag.clone(), format!("W/{tag}"), format!("\"other\", {tag}")] {
            let again = app
                .client
                .get(app.url(path))
                .header("if-none-match", matching)
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), 304, "{path}");
            assert_eq!(header(&again, "etag"), tag);
            assert_protected(&again);
            assert!(again.bytes().await.unwrap().is_empty());
        }
        let changed = app
            .client
            .get(app.url(path))
            .header("if-none-match", "\"0000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(changed.status(), 200);
    }

    let bare = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url("/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 308);
    assert_eq!(header(&bare, "location"), "/admin/");

    let posted = app.client.post(app.url("/admin/")).send().await.unwrap();
    assert_eq!(posted.status(), 405);
    assert_eq!(header(&posted, "allow"), "GET");
    for path in ["/admin/app.mjs", "/admin//", "/admin/app.js/"] {
        let missing = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(missing.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn the_page_names_the_configured_auth_header() {
    let app = spawn_app(&[("DEFAULT_AUTH_HEADER", "x-api-key")]).await;
    let page = app.client.get(app.url("/admin/")).send().await.unwrap();
    let text = page.text().await.unwrap();
    assert!(
        text.contains("<meta name=\"auth-header\" content=\"x-api-key\">"),
        "{text}"
    );
}

#[tokio::test]
async fn without_an_admin_token_there_is_no_page() {
    let app = spawn_app(&[("ADMIN_TOKEN", "")]).await;
    for path in [
        "/admin/",
        "/admin",
        "/admin/app.css",
        "/admin/app.js",
        "/admin/activity",
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_json_error(response, 404, "not_found", "No such route").await;
    }
}

#[tokio::test]
async fn activity_counts_the_requests_of_the_last_hour_minute_by_minute() {
    let app = spawn_app(&[]).await;
    let refused = app
        .client
        .get(app.url("/admin/activity"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    for _ in 0..3 {
        assert_eq!(
            app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
            200
        );
    }
    // The admin route itself is not traffic.
    app.admin_get("/admin/clients").await;
    let answer = app.admin_get("/admin/activity").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "cache-control"), "no-store");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["mode"], "local");
    let minutes = body["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let times: Vec<std::time::SystemTime> = minutes
        .iter()
        .map(|minute| humantime::parse_rfc3339(minute["minute"].as_str().unwrap()).unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!(
            pair[1].duration_since(pair[0]).unwrap(),
            Duration::from_secs(60),
            "one a minute, oldest first"
        );
    }
    let requests: u64 = minutes
        .iter()
        .map(|minute| minute["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 3);
    let recent: u64 = minutes[58..]
        .iter()
        .map(|minute| minute["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(recent, 3, "in this minute, or the one before it: {body}");
    let last = &minutes[59];
    assert_eq!(last["usd"], 0.0);
    assert_eq!(last["refusals"], 0);

    // What the spend accounting will feed, shown in dollars.
    app.state
        .metrics
        .activity()
        .record_spend(std::time::SystemTime::now(), 1_234_567_000);
    let body: Value = app.admin_get("/admin/activity").await.json().await.unwrap();
    let spent: f64 = body["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|minute| minute["usd"].as_f64().unwrap())
        .sum();
    assert!((spent - 1.234567).abs() < 1e-9, "{spent}");
}

#[tokio::test]
async fn clients_show_their_state_and_last_hours_refusals_by_reason() {
    let (app, _) = spawn_with_clients(
        r#"
[clients.alice]
token = "tok-alice"
requests_per_minute = 1
models = ["gpt-mock"]

[clients.old]
token = "tok-old"
expires_at = 2020-01-01T00:00:00Z

[clients.off]
token = "tok-off"
disabled = true
"#,
    )
    .await;
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        429
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        429
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("other")).await.status(),
        403
    );

    let answer = app.admin_get("/admin/clients").await;
    assert_eq!(header(&answer, "cache-control"), "no-store");
    let body: Value = answer.json().await.unwrap();
    let client = |name: &str| {
        body["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|client| client["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {body}"))
            .clone()
    };
    let alice = client("alice");
    assert_eq!(alice["state"], "active");
    assert_eq!(
        alice["usage"]["refusals_last_hour"],
        serde_json::json!({"requests_per_minute": 2, "model_not_allowed": 1})
    );
    assert_eq!(alice["usage"]["requests_last_minute"], 1);
    assert_eq!(client("old")["state"], "expired");
    assert_eq!(client("off")["state"], "disabled");
    assert_eq!(
        client("off")["usage"]["refusals_last_hour"],
        serde_json::json!({})
    );

    let activity: Value = app.admin_get("/admin/activity").await.json().await.unwrap();
    let refusals: u64 = activity["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|minute| minute["refusals"].as_u64().unwrap())
        .sum();
    assert_eq!(refusals, 3);
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed: apt-get install -y redis-server"
)]
async fn replicas_sharing_redis_show_one_hour() {
    let redis = RedisServer::start();
    let file = scratch_dir("activity").join("clients.toml");
    std::fs::write(
        &file,
        "[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 2\n",
    )
    .unwrap();
    let url = redis.url();
    let clients = file.to_str().unwrap();
    let settings = [("CLIENTS_FILE", clients), ("REDIS_URL", url.as_str())];
    let one = spawn_app(&settings).await;
    let two = spawn_app(&settings).await;
    for app in [&one, &two] {
        let shared = eventually(Duration::from_secs(5), async || {
            let body: Value = app.admin_get("/admin/activity").await.json().await.unwrap();
            (body["mode"] == "shared").then_some(())
        })
        .await;
        assert!(shared.is_some(), "both replicas reach Redis");
    }
    for _ in 0..3 {
        one.chat("tok-alice", chat_body("gpt-mock")).await;
    }
    assert_eq!(
        two.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        429
    );
    one.state
        .metrics
        .activity()
        .record_spend(std::time::SystemTime::now(), 2_000_000_000);

    // Each replica sends its counts within a second; both then show the same hour.
    let totals = |body: &Value| {
        let minutes = body["minutes"].as_array().unwrap();
        let sum = |field: &str| -> u64 {
            minutes
                .iter()
                .map(|minute| minute[field].as_u64().unwrap_or(0))
                .sum()
        };
        let usd: f64 = minutes
            .iter()
            .map(|minute| minute["usd"].as_f64().unwrap())
            .sum();
        (sum("requests"), sum("refusals"), usd)
    };
    for app in [&one, &two] {
        let seen = eventually(Duration::from_secs(5), async || {
            let body: Value = app.admin_get("/admin/activity").await.json().await.unwrap();
            (totals(&body) == (4, 2, 2.0)).then_some(())
        })
        .await;
        assert!(seen.is_some(), "4 requests, 2 refused, $2 on both replicas");
        let clients: Value = app.admin_get("/admin/clients").await.json().await.unwrap();
        let alice = clients["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|client| client["name"] == "alice")
            .unwrap();
        assert_eq!(
            alice["usage"]["refusals_last_hour"],
            serde_json::json!({"requests_per_minute": 2})
        );
    }
    let keys = redis.command(&["KEYS", "llm-proxy:{activity}:*"]);
    assert!(keys.contains("llm-proxy:{activity}:minute:"), "{keys}");
    let key = keys
        .lines()
        .find(|line| line.starts_with("llm-proxy:"))
        .unwrap()
        .to_string();
    let ttl: u64 = redis
        .command(&["TTL", &key])
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 7000 && ttl <= 7200, "expires after two hours: {ttl}");
}
