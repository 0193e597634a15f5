//! The status page in a real browser: Debian's `chromium`, headless, driven over WebDriver by
//! `chromedriver` (started here on a free loopback port), against a real proxy with a clients
//! file, two mock upstreams and traffic. Where the two are not installed the test is ignored
//! with a notice naming the packages (see `build.rs`; `LLM_PROXY_REQUIRE_BROWSER=1` makes that a
//! build failure, as CI sets it).
//!
//! With `LLM_PROXY_SCREENSHOTS=1` it also writes `docs/status-page-light.png` and
//! `docs/status-page-dark.png`. Nothing is compared pixel by pixel: the test asserts what the
//! page says and does.

use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use mock_upstream::MockUpstream;
use serde_json::{Value, json};

use crate::clients::{chat_body, scratch_dir};
use crate::helpers::*;

/// How long the page may take to show a change: one refresh (5 s), and some slack.
const ONE_REFRESH: Duration = Duration::from_millis(7000);

/// `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (Debian package chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Driver { child, port }
    }

    /// A fresh headless browser with a profile of its own, logging its console.
    async fn session(&self, profile: &std::path::Path) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which("chromium"),
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    // Numbers are formatted for the browser's language: one, for the asserts.
                    "--lang=en-US",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(binary: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{binary} on PATH"))
}

/// chromedriver's own commands, beside the standard ones.
#[derive(Debug)]
enum Chromedriver {
    /// The console lines logged since the last call.
    BrowserLog,
    /// A DevTools command (`Emulation.setEmulatedMedia`...).
    Cdp(&'static str, Value),
}

impl WebDriverCompatibleCommand for Chromedriver {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let session = session_id.unwrap_or_default();
        match self {
            Chromedriver::BrowserLog => base_url.join(&format!("session/{session}/se/log")),
            Chromedriver::Cdp(..) => base_url.join(&format!("session/{session}/goog/cdp/execute")),
        }
    }

    fn method_and_body(&self, _: &url::Url) -> (warp::http::Method, Option<String>) {
        let body = match self {
            Chromedriver::BrowserLog => json!({"type": "browser"}),
            Chromedriver::Cdp(cmd, params) => json!({"cmd": cmd, "params": params}),
        };
        (warp::http::Method::POST, Some(body.to_string()))
    }
}

/// Runs `script` (a function body) in the page and returns its value.
async fn run(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.unwrap()
}

/// Waits until `script` returns `true` in the page, or panics saying `what` after `limit`.
async fn until(browser: &Client, limit: Duration, script: &str, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        if run(browser, script).await == json!(true) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of the cells of the clients table's row for `name`, in column order.
async fn client_row(browser: &Client, name: &str) -> Vec<String> {
    let cells = run(
        browser,
        &format!(
            "const row = document.querySelector('#clients tr[data-client=\"{name}\"]');
             return row ? [...row.children].map((cell) => cell.textContent) : null;"
        ),
    )
    .await;
    serde_json::from_value(cells).unwrap_or_else(|_| panic!("no row for {name}"))
}

async fn shown_clients(browser: &Client) -> Vec<String> {
    let names = run(
        browser,
        "return [...document.querySelectorAll('#clients tbody tr')].map((row) => row.dataset.client);",
    )
    .await;
    serde_json::from_value(names).unwrap()
}

async fn upstream_cells(browser: &Client, name: &str) -> Vec<String> {
    let cells = run(
        browser,
        &format!(
            "const row = document.querySelector('#upstreams tr[data-upstream=\"{name}\"]');
             return row ? [...row.children].map((cell) => cell.textContent) : null;"
        ),
    )
    .await;
    serde_json::from_value(cells).unwrap_or_else(|_| panic!("no row for upstream {name}"))
}

/// Dollars as the page writes them (en-US): below a dollar to the micro-dollar, with at least
/// two decimals; cents above.
fn dollars(value: f64) -> String {
    assert!(
        value.abs() < 1000.0,
        "no thousands separator written here: {value}"
    );
    if value != 0.0 && value.abs() < 1.0 {
        let text = format!("{value:.6}");
        let trimmed = text.trim_end_matches('0');
        let decimals = trimmed.len() - trimmed.find('.').unwrap() - 1;
        if decimals < 2 {
            format!("${value:.2}")
        } else {
            format!("${trimmed}")
        }
    } else {
        format!("${value:.2}")
    }
}

/// Waits until what the page shows (`shown`) is what the JSON says (`expected`), both read
/// afresh each time, for at most two refreshes; then asserts they are equal.
async fn settle_on<E, EF, S, SF>(expected: E, shown: S, what: &str)
where
    E: Fn() -> EF,
    EF: std::future::Future<Output = Vec<String>>,
    S: Fn() -> SF,
    SF: std::future::Future<Output = Vec<String>>,
{
    let deadline = Instant::now() + 2 * ONE_REFRESH;
    loop {
        let (want, got) = (expected().await, shown().await);
        if want == got || Instant::now() >= deadline {
            assert_eq!(got, want, "{what}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every console line logged so far.
async fn console(browser: &Client) -> Vec<String> {
    let entries = browser.issue_cmd(Chromedriver::BrowserLog).await.unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| format!("{} {}", entry["level"], entry["message"]))
        .collect()
}

const CLIENTS: &str = r#"
[clients.alice]
token = "tok-alice-0123456789"
requests_per_minute = 60
tokens_per_minute = 10000
tokens_per_day = 100000
max_concurrent_requests = 4
usd_per_day = 5

[clients.bob]
token = "tok-bob-0123456789"
requests_per_minute = 1

[clients.carol]
token = "tok-carol-0123456789"
disabled = true

[clients.dave]
token = "tok-dave-0123456789"
expires_at = 2020-01-01T00:00:00Z
"#;

const SECRETS: [&str; 9] = [
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    "tok-alice-0123456789",
    "tok-bob-0123456789",
    "tok-carol-0123456789",
    "tok-dave-0123456789",
    "sk-a-1",
    "sk-b-1",
    "sk-b-2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    no_browser,
    ignore = "chromium or chromedriver is not installed: apt-get install -y chromium chromium-driver"
)]
async fn the_status_page_shows_the_proxy_in_a_real_browser() {
    // Two upstreams: a (tier 0, one key) serves gpt-mock, b (two keys) serves gpt-b; both
    // models priced, so every answer the mocks give (they report usage) costs something.
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let dir = scratch_dir("status-page");
    std::fs::write(dir.join("a.keys"), "sk-a-1\n").unwrap();
    std::fs::write(dir.join("b.keys"), "sk-b-1\nsk-b-2\n").unwrap();
    let upstreams = format!(
        "default = \"a\"\nmax_attempts = 3\n\n\
         [prices]\n\"gpt-mock\" = {{ input = 2.50, output = 10.00 }}\n\
         \"gpt-b\" = {{ input = 0.50, output = 2.00 }}\n\n\
         [upstreams.a]\nbase_url = \"{}/v1\"\nkeys_file = \"{}\"\nmodels = [\"gpt-mock\"]\ntier = 0\n\n\
         [upstreams.b]\nbase_url = \"{}/v1\"\nkeys_file = \"{}\"\nmodels = [\"gpt-b\"]\nweight = 2\n",
        a.base_url(),
        dir.join("a.keys").display(),
        b.base_url(),
        dir.join("b.keys").display(),
    );
    std::fs::write(dir.join("upstreams.toml"), upstreams).unwrap();
    std::fs::write(dir.join("clients.toml"), CLIENTS).unwrap();
    let app = Proxy::new()
        .env("AUTH_VALIDATION", "true")
        .env("ALLOWED_TOKENS", CLIENT_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env(
            "UPSTREAMS_FILE",
            dir.join("upstreams.toml").to_str().unwrap(),
        )
        .env("CLIENTS_FILE", dir.join("clients.toml").to_str().unwrap())
        .start_in_process()
        .await;

    // Traffic: alice twice, bob once too often, and b's second key rate-limited (it rests).
    for _ in 0..2 {
        assert_eq!(
            app.chat("tok-alice-0123456789", chat_body("gpt-mock"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        app.chat("tok-bob-0123456789", chat_body("gpt-mock"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.chat("tok-bob-0123456789", chat_body("gpt-mock"))
            .await
            .status(),
        429
    );
    b.answer_key("sk-b-2", 429, &[("retry-after", "60")]);
    for _ in 0..2 {
        assert_eq!(
            app.chat(CLIENT_TOKEN, chat_body("gpt-b")).await.status(),
            200
        );
    }
    let listed: Value = app
        .admin_get("/admin/upstreams")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["upstreams"][1]["keys"][1]["state"], "resting",
        "{listed}"
    );

    let driver = Driver::start();
    let profile = scratch_dir("chromium-profile");
    let browser = driver.session(&profile).await;
    // The browser is closed whatever the checks end in: a failed assertion must not leave a
    // chromium behind.
    let outcome = AssertUnwindSafe(exercise(&app, &a, &browser))
        .catch_unwind()
        .await;
    let _ = browser.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The page's checks.
async fn exercise(app: &TestApp, a: &MockUpstream, browser: &Client) {
    let origin = format!("http://{}", app.addr);
    browser.goto(&app.url("/admin")).await.unwrap();
    assert_eq!(
        browser.current_url().await.unwrap().as_str(),
        format!("{origin}/admin/"),
        "/admin is sent to /admin/"
    );
    let form = browser.find(Locator::Id("token-form")).await.unwrap();
    assert!(form.is_displayed().await.unwrap(), "the token form first");
    assert!(
        !browser
            .find(Locator::Id("status"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );

    // A wrong token: the 401 is said, the form stays, nothing is kept.
    let input = browser.find(Locator::Id("token")).await.unwrap();
    input.send_keys("wrong-token-42").await.unwrap();
    browser
        .find(Locator::Css("#token-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        browser,
        ONE_REFRESH,
        "return !document.getElementById('message').hidden",
        "the 401 message",
    )
    .await;
    let message = browser
        .find(Locator::Id("message"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        message.contains("The admin token was refused (401 unauthorized)"),
        "{message}"
    );
    assert!(!message.contains("wrong-token-42"), "{message}");
    assert!(form.is_displayed().await.unwrap());
    assert_eq!(run(browser, "return sessionStorage.length").await, json!(0));

    // The right one: the tables come, the form goes.
    let input = browser.find(Locator::Id("token")).await.unwrap();
    input.send_keys(ADMIN_TOKEN).await.unwrap();
    input.send_keys("\u{E007}").await.unwrap();
    until(
        browser,
        ONE_REFRESH,
        "return document.querySelectorAll('#clients tbody tr').length > 0",
        "the clients table",
    )
    .await;
    assert!(!form.is_displayed().await.unwrap());
    assert!(
        browser
            .find(Locator::Id("message"))
            .await
            .unwrap()
            .attr("hidden")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        run(browser, "return document.getElementById('token').value").await,
        json!(""),
        "the field keeps no copy"
    );

    // The clients table says what the JSON says.
    let clients: Value = app.admin_get("/admin/clients").await.json().await.unwrap();
    let alice = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|client| client["name"] == "alice")
        .unwrap();
    assert_eq!(alice["usage"]["requests_last_minute"], 2);
    let tokens_today = alice["usage"]["tokens_today"].as_u64().unwrap();
    assert!(tokens_today > 0);
    let row = client_row(browser, "alice").await;
    assert_eq!(row[0], "alice");
    assert_eq!(row[1], "active");
    assert_eq!(row[2], "2 req of 60 req");
    assert_eq!(
        row[3],
        format!("{} tok of 10,000 tok", alice["usage"]["tokens_last_minute"])
    );
    assert_eq!(row[4], format!("{tokens_today} tok of 100,000 tok"));
    assert_eq!(
        row[7], "0 of 4",
        "in flight against max_concurrent_requests"
    );
    assert_eq!(row[8], "none");
    assert_eq!(row.len(), 9, "the two dollar columns with the rest");
    let bob = client_row(browser, "bob").await;
    assert_eq!(bob[2], "1 req of 1 req");
    assert_eq!(
        bob[8], "requests_per_minute: 1",
        "bob's refusal and its reason"
    );
    assert_eq!(
        run(
            browser,
            "return document.querySelector('#clients tr[data-client=\"bob\"] td:nth-of-type(2) span').className"
        )
        .await,
        json!("over"),
        "bob is at his limit"
    );
    assert_eq!(client_row(browser, "carol").await[1], "disabled");
    assert_eq!(client_row(browser, "dave").await[1], "expired");
    assert_eq!(
        run(
            browser,
            "return getComputedStyle(document.querySelector('#clients td.num')).textAlign"
        )
        .await,
        json!("right"),
        "numbers right-aligned"
    );

    // Dollars: alice's today against her budget, as /admin/clients says; the Spend section by
    // model and by upstream, as /admin/spend says. Polled, as a request's cost is settled as its
    // answer ends and the page shows it at its next refresh.
    let expected_alice = || async {
        let clients: Value = app.admin_get("/admin/clients").await.json().await.unwrap();
        let alice = clients["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|client| client["name"] == "alice")
            .unwrap()
            .clone();
        assert_eq!(alice["limits"]["usd_per_day"], 5.0, "{alice}");
        let today = alice["usage"]["usd_today"].as_f64().unwrap();
        let month = alice["usage"]["usd_this_month"].as_f64().unwrap();
        assert!(today > 0.0, "alice's two answers cost something: {alice}");
        vec![format!("{} of $5.00", dollars(today)), dollars(month)]
    };
    let shown_alice = || async { client_row(browser, "alice").await[5..7].to_vec() };
    settle_on(expected_alice, shown_alice, "alice's dollars").await;
    assert_eq!(
        run(
            browser,
            "return getComputedStyle(document.querySelector('#spend-model td.num')).textAlign"
        )
        .await,
        json!("right"),
        "dollars right-aligned"
    );
    for by in ["model", "upstream"] {
        let expected = || async {
            let report: Value = app
                .admin_get(&format!("/admin/spend?by={by}"))
                .await
                .json()
                .await
                .unwrap();
            let mut lines = vec![format!(
                "UTC day {}, month {}",
                report["day"].as_str().unwrap(),
                report["month"].as_str().unwrap()
            )];
            let groups = report["groups"].as_array().unwrap();
            assert_eq!(groups.len(), 2, "{report}");
            for group in groups {
                assert!(group["usd_today"].as_f64().unwrap() > 0.0, "{report}");
                lines.push(format!(
                    "{} {} {} {} req",
                    group["key"].as_str().unwrap(),
                    dollars(group["usd_today"].as_f64().unwrap()),
                    dollars(group["usd_this_month"].as_f64().unwrap()),
                    group["requests_today"]
                ));
            }
            lines
        };
        let shown = || async {
            let lines = run(
                browser,
                &format!(
                    "return [document.getElementById('spend-period').textContent,
                      ...[...document.querySelectorAll('#spend-{by} tbody tr')].map((row) =>
                        [...row.children].map((cell) => cell.textContent).join(' '))];"
                ),
            )
            .await;
            serde_json::from_value::<Vec<String>>(lines).unwrap()
        };
        settle_on(expected, shown, &format!("the spend by {by}")).await;
    }
    let models: Vec<String> = serde_json::from_value(
        run(
            browser,
            "return [...document.querySelectorAll('#spend-model tbody tr')].map((row) => row.dataset.key)",
        )
        .await,
    )
    .unwrap();
    let mut sorted = models.clone();
    sorted.sort();
    assert_eq!(sorted, ["gpt-b", "gpt-mock"], "{models:?}");

    // The dollars of the hour: the figure is the sum /admin/activity says, and not nothing.
    let expected_hour = || async {
        let activity: Value = app.admin_get("/admin/activity").await.json().await.unwrap();
        let spent: f64 = activity["minutes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|minute| minute["usd"].as_f64().unwrap())
            .sum();
        assert!(spent > 0.0, "{activity}");
        vec![format!("{}/h", dollars(spent))]
    };
    let shown_hour = || async {
        vec![
            browser
                .find(Locator::Id("usd-hour"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        ]
    };
    settle_on(expected_hour, shown_hour, "the dollars of the hour").await;
    assert_ne!(shown_hour().await, ["$0.00/h"]);
    assert_eq!(
        run(
            browser,
            "return [...document.querySelectorAll('#usd-chart svg rect')].some((bar) => Number(bar.getAttribute('height')) > 0)"
        )
        .await,
        json!(true),
        "a bar for the minute that cost something"
    );

    // The upstreams: b's second key rests, with the exact time on hover.
    let listed: Value = app
        .admin_get("/admin/upstreams")
        .await
        .json()
        .await
        .unwrap();
    let b_entry = &listed["upstreams"][1];
    let b_row = upstream_cells(browser, "b").await;
    assert_eq!(
        b_row[..3],
        [
            "b".to_string(),
            b_entry["tier"].to_string(),
            "2".to_string()
        ]
    );
    assert_eq!(b_row[3], "closed");
    assert!(b_row[6].contains("#1 usable"), "{b_row:?}");
    assert!(b_row[6].contains("#2 resting until in "), "{b_row:?}");
    let title = run(
        browser,
        "return document.querySelector('#upstreams tr[data-upstream=\"b\"] .key-resting time').title",
    )
    .await;
    assert!(
        title.as_str().is_some_and(|title| !title.is_empty()),
        "{title}"
    );
    assert_eq!(upstream_cells(browser, "a").await[3], "closed");

    // Five failures of a open its breaker: the page shows it within one refresh.
    a.answer_key("sk-a-1", 503, &[]);
    for _ in 0..5 {
        assert_eq!(
            app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
            503
        );
    }
    let listed: Value = app
        .admin_get("/admin/upstreams")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["upstreams"][0]["breaker"]["state"], "open",
        "{listed}"
    );
    let opened = Instant::now();
    until(
        browser,
        ONE_REFRESH,
        "return document.querySelector('#upstreams tr[data-upstream=\"a\"] .breaker').textContent === 'open'",
        "a's breaker shown open",
    )
    .await;
    assert!(
        opened.elapsed() < Duration::from_millis(6000),
        "within one refresh (5 s) and its fetch"
    );
    let a_row = upstream_cells(browser, "a").await;
    assert!(a_row[3].starts_with("open may close in "), "{a_row:?}");
    assert_eq!(a_row[5], "status_503");

    // The hour: requests counted, mode local.
    assert_eq!(
        browser
            .find(Locator::Id("mode"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "local"
    );
    let requests = browser
        .find(Locator::Id("requests-now"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(requests, "11 req/h", "2 + 2 + 2 + 5 requests under /v1");
    assert_eq!(
        run(
            browser,
            "return document.querySelectorAll('#requests-chart svg rect').length"
        )
        .await,
        json!(60)
    );

    // A hidden tab is not refreshed; shown again, it refreshes at once.
    let refreshes = "return Number(document.getElementById('status').dataset.refreshes)";
    run(
        browser,
        "Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
         document.dispatchEvent(new Event('visibilitychange'));",
    )
    .await;
    let hidden_at = run(browser, refreshes).await;
    tokio::time::sleep(Duration::from_millis(5600)).await;
    assert_eq!(
        run(browser, refreshes).await,
        hidden_at,
        "no refresh while hidden"
    );
    run(
        browser,
        "Object.defineProperty(document, 'visibilityState', {value: 'visible', configurable: true});
         document.dispatchEvent(new Event('visibilitychange'));",
    )
    .await;
    until(
        browser,
        Duration::from_secs(2),
        &format!(
            "return Number(document.getElementById('status').dataset.refreshes) > {hidden_at}"
        ),
        "a refresh as the tab is shown again",
    )
    .await;

    // Sorting, by mouse and by keyboard (the counts now include the five failures).
    let clients: Value = app.admin_get("/admin/clients").await.json().await.unwrap();
    browser
        .find(Locator::Css("#clients th[data-key=\"name\"] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let names = shown_clients(browser).await;
    let mut descending = names.clone();
    descending.sort_by(|x, y| y.cmp(x));
    assert_eq!(
        names, descending,
        "a second click on the name sorts descending"
    );
    assert_eq!(
        run(browser, "return document.querySelector('#clients th[data-key=\"name\"]').getAttribute('aria-sort')").await,
        json!("descending")
    );
    run(
        browser,
        "document.querySelector('#clients th[data-key=\"requests\"] button').focus()",
    )
    .await;
    browser
        .active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap();
    let names = shown_clients(browser).await;
    assert_eq!(
        names.first().map(String::as_str),
        Some("carol"),
        "{names:?}"
    );
    let counts: Vec<u64> = names
        .iter()
        .map(|name| {
            clients["clients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|client| client["name"] == name.as_str())
                .unwrap()["usage"]["requests_last_minute"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        counts.windows(2).all(|pair| pair[0] <= pair[1]),
        "{names:?} {counts:?}"
    );
    assert_eq!(*counts.last().unwrap(), 7, "the unlimited client's 2 + 5");

    // Filtering, by name and by refusal reason.
    let filter = browser.find(Locator::Id("filter")).await.unwrap();
    filter.send_keys("bo").await.unwrap();
    assert_eq!(shown_clients(browser).await, ["bob"]);
    filter.clear().await.unwrap();
    filter.send_keys("requests_per").await.unwrap();
    assert_eq!(shown_clients(browser).await, ["bob"]);
    filter.clear().await.unwrap();
    filter.send_keys("expired").await.unwrap();
    assert_eq!(shown_clients(browser).await, ["dave"]);
    filter.clear().await.unwrap();
    run(
        browser,
        "document.getElementById('filter').dispatchEvent(new Event('input'))",
    )
    .await;
    assert_eq!(shown_clients(browser).await.len(), 5);

    // Phone width: the page itself never scrolls sideways (the tables scroll in their box).
    browser.set_window_size(390, 844).await.unwrap();
    until(
        browser,
        Duration::from_secs(2),
        "return window.innerWidth < 500",
        "the narrow window",
    )
    .await;
    assert_eq!(
        run(
            browser,
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
        .await,
        json!(true)
    );
    browser.set_window_size(1280, 1000).await.unwrap();

    // Light and dark.
    let background = "return getComputedStyle(document.body).backgroundColor";
    let light = run(browser, background).await;
    screenshot(browser, "light").await;
    browser
        .issue_cmd(Chromedriver::Cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
        ))
        .await
        .unwrap();
    let dark = run(browser, background).await;
    assert_eq!(light, json!("rgb(255, 255, 255)"));
    assert_eq!(dark, json!("rgb(13, 17, 23)"), "prefers-color-scheme: dark");
    screenshot(browser, "dark").await;

    // No token anywhere the page or the browser shows or keeps one.
    let source = run(browser, "return document.documentElement.outerHTML").await;
    let source = source.as_str().unwrap();
    let href = browser.current_url().await.unwrap().to_string();
    let cookies = run(browser, "return document.cookie").await;
    let log = console(browser).await;
    for secret in SECRETS.iter().chain(["wrong-token-42"].iter()) {
        assert!(!source.contains(secret), "{secret} in the page");
        assert!(!href.contains(secret), "{secret} in {href}");
        assert!(
            log.iter().all(|line| !line.contains(secret)),
            "{secret} in {log:?}"
        );
    }
    assert_eq!(cookies, json!(""));
    assert!(
        log.iter()
            .all(|line| !line.contains("Content Security Policy")),
        "nothing the policy had to refuse: {log:?}"
    );

    // Nothing from another origin.
    let resources = run(
        browser,
        "return performance.getEntriesByType('resource').map((entry) => entry.name)",
    )
    .await;
    let resources: Vec<String> = serde_json::from_value(resources).unwrap();
    for path in [
        "/admin/app.js",
        "/admin/app.css",
        "/admin/clients",
        "/admin/activity",
        "/admin/spend?by=model",
        "/admin/spend?by=upstream",
    ] {
        let url = format!("{origin}{path}");
        assert!(resources.contains(&url), "{url} in {resources:?}");
    }
    for resource in &resources {
        assert!(resource.starts_with(&format!("{origin}/")), "{resource}");
    }
}

/// With `LLM_PROXY_SCREENSHOTS=1`, the page as it is now, to `docs/status-page-<name>.png`.
async fn screenshot(browser: &Client, name: &str) {
    if std::env::var_os("LLM_PROXY_SCREENSHOTS").is_none_or(|value| value != "1") {
        return;
    }
    let png = browser.screenshot().await.unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(format!("status-page-{name}.png"));
    std::fs::write(&path, png).unwrap();
}
