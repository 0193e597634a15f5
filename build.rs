//! Whether `redis-server` is on `PATH`, for the shared-state tests, and `chromium` with
//! `chromedriver`, for the status page's browser test: without them those tests are marked
//! ignored (libtest prints the reason, naming the Debian packages) rather than counted as passed,
//! and with `LLM_PROXY_REQUIRE_REDIS=1` or `LLM_PROXY_REQUIRE_BROWSER=1` (CI) an absence fails
//! the build. libtest has no way to skip a test at run time, so the question is asked here, once
//! per build.

use std::env;
use std::path::PathBuf;

const BINARY: &str = "redis-server";
/// The browser and its WebDriver server (Debian's `chromium` and `chromium-driver`).
const BROWSER: [&str; 2] = ["chromium", "chromedriver"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_redis_server)");
    println!("cargo::rustc-check-cfg=cfg(no_browser)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=LLM_PROXY_REQUIRE_REDIS");
    println!("cargo::rerun-if-env-changed=LLM_PROXY_REQUIRE_BROWSER");
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = env::split_paths(&path).filter(|dir| dir.is_dir()).collect();
    // A directory, not the binary: installing it into one of them is seen, and a missing file
    // would make cargo run this script (and rebuild the crate) on every build.
    for dir in &dirs {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    let installed = |binary: &str| dirs.iter().any(|dir| dir.join(binary).is_file());
    if !BROWSER.iter().all(|binary| installed(binary)) {
        let notice = "chromium or chromedriver is not installed: the status page's browser test \
                      is ignored; install the Debian packages chromium and chromium-driver \
                      (apt-get install -y chromium chromium-driver) to run it";
        if env::var_os("LLM_PROXY_REQUIRE_BROWSER").is_some_and(|value| value == "1") {
            eprintln!("{notice}; LLM_PROXY_REQUIRE_BROWSER=1 makes this a failure");
            std::process::exit(1);
        }
        println!("cargo::warning={notice}");
        println!("cargo::rustc-cfg=no_browser");
    }
    if installed(BINARY) {
        return;
    }
    let notice = "redis-server is not installed: the shared-state (Redis) tests are ignored; \
                  install the Debian package redis-server (apt-get install -y redis-server) to run them";
    if env::var_os("LLM_PROXY_REQUIRE_REDIS").is_some_and(|value| value == "1") {
        eprintln!("{notice}; LLM_PROXY_REQUIRE_REDIS=1 makes this a failure");
        std::process::exit(1);
    }
    println!("cargo::warning={notice}");
    println!("cargo::rustc-cfg=no_redis_server");
}
