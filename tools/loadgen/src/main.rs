//! Load generator for llm-proxy's own scripts, one binary with two modes:
//!
//! * `loadgen soak --port P --token T --max-body N [...]`: the mixed load of scripts/soak.sh
//!   (plain, streamed and cancelled chats, oversized and malformed requests, bad tokens, the
//!   model list), every request checked against its expected answer; a per-kind table on stdout,
//!   `--json FILE` for the figures; `--ready` and `--fill` are the two short helper modes.
//!   Exit 0 when nothing was lost, 1 when something was, 2 on a usage error.
//! * `loadgen sse --port P [...]`: the streaming load of scripts/bench/run.py (keep-alive
//!   connections running SSE streams back to back, time to first chunk and gaps between chunks
//!   as hdrhistogram percentiles); one JSON object on stdout.
//!
//! Both talk to loopback addresses only. Built with `cargo build --release -p loadgen` (it is a
//! workspace member but not a default one, so a plain `cargo test` does not build it).
//!
//! One thread, on purpose: the benchmark pins the load generator to a core of its own, and on a
//! 2-core machine the soak should leave the other core to the proxy and the mock; the run
//! reports its own CPU use, so a run where the generator was the bottleneck shows as such.

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod http;
mod rng;
mod soak;
mod sse;
mod sse_bench;
mod sys;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator for llm-proxy's soak test and streaming benchmark"
)]
enum Cli {
    /// Mixed load with expected answers, for scripts/soak.sh.
    Soak(soak::Args),
    /// SSE streams with latency percentiles, for scripts/bench/run.py.
    Sse(sse_bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli {
        Cli::Soak(args) => soak::main(args, &runtime),
        Cli::Sse(args) => sse_bench::main(args, &runtime),
    }
}
