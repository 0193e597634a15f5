//! Load generator and bench tools for llm-proxy's own scripts, one binary:
//!
//! * `loadgen soak --port P --token T --max-body N [...]`: the mixed load of scripts/soak.sh
//!   (plain, streamed and cancelled chats, oversized and malformed requests, bad tokens, the
//!   model list), every request checked against its expected answer; a per-kind table on stdout,
//!   `--json FILE` for the figures; `--ready` and `--fill` are the two short helper modes.
//!   Exit 0 when nothing was lost, 1 when something was, 2 on a usage error.
//! * `loadgen sse --port P [...]`: the streaming load of `loadgen bench` (keep-alive
//!   connections running SSE streams back to back, time to first chunk and gaps between chunks
//!   as hdrhistogram percentiles); one JSON object on stdout.
//! * `loadgen bench`: the benchmark of scripts/bench.sh (direct vs nginx vs llm-proxy, its
//!   settings in BENCH_* variables); a table on stdout, the figures in target/bench/results.json.
//! * `loadgen callgrind [--clients N] [--limited] [--priced] [--routed]`: instructions per plain request and per
//!   streamed chunk of the release proxy under valgrind; one JSON object on stdout.
//! * `loadgen procinfo snapshot|settle|describe|cpu-ticks ...`: the soak's readings of the
//!   proxy process (RSS, fds by kind, threads, CPU).
//! * `loadgen free-port`: a free TCP port on 127.0.0.1.
//!
//! All of them talk to loopback addresses only. Built with `cargo build --release -p loadgen`.
//!
//! The load generators run one thread, on purpose: the benchmark pins the load generator to a
//! core of its own, and on a 2-core machine the soak should leave the other core to the proxy
//! and the mock; the run reports its own CPU use, so a run where the generator was the
//! bottleneck shows as such.

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod bench;
mod callgrind;
mod http;
mod procinfo;
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
    about = "Load generator and bench tools for llm-proxy's soak test and benchmark"
)]
enum Cli {
    /// Mixed load with expected answers, for scripts/soak.sh.
    Soak(soak::Args),
    /// SSE streams with latency percentiles, for `loadgen bench`.
    Sse(sse_bench::Args),
    /// The benchmark of scripts/bench.sh: direct vs nginx vs llm-proxy (settings: BENCH_*).
    Bench(bench::Args),
    /// Instructions per plain request and per streamed chunk, under callgrind.
    Callgrind(callgrind::Args),
    /// Readings of one process for scripts/soak.sh.
    #[command(subcommand)]
    Procinfo(procinfo::Command),
    /// Prints a TCP port on 127.0.0.1 that is free.
    FreePort,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("loadgen: cannot start the runtime: {err}");
            ExitCode::FAILURE
        })
}

fn main() -> ExitCode {
    match Cli::parse() {
        Cli::Soak(args) => runtime().map_or_else(|code| code, |rt| soak::main(args, &rt)),
        Cli::Sse(args) => runtime().map_or_else(|code| code, |rt| sse_bench::main(args, &rt)),
        Cli::Callgrind(args) => runtime().map_or_else(|code| code, |rt| callgrind::main(args, &rt)),
        Cli::Bench(args) => bench::main(args),
        Cli::Procinfo(command) => procinfo::main(command),
        Cli::FreePort => match sys::free_port() {
            Ok(port) => {
                println!("{port}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen free-port: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
