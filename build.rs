//! Whether `redis-server` is on `PATH`, for the shared-state tests: without it they are marked
//! ignored (libtest prints the reason, naming the Debian package) rather than counted as passed,
//! and with `LLM_PROXY_REQUIRE_REDIS=1` (CI) its absence fails the build. libtest has no way to
//! skip a test at run time, so the question is asked here, once per build.

use std::env;
use std::path::PathBuf;

const BINARY: &str = "redis-server";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_redis_server)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=LLM_PROXY_REQUIRE_REDIS");
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = env::split_paths(&path).filter(|dir| dir.is_dir()).collect();
    // A directory, not the binary: installing it into one of them is seen, and a missing file
    // would make cargo run this script (and rebuild the crate) on every build.
    for dir in &dirs {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    if dirs.iter().any(|dir| dir.join(BINARY).is_file()) {
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
