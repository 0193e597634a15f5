//! Integration tests: the proxy on a real listener, a mock upstream on 127.0.0.1.

mod admin;
mod auth;
mod budget;
mod client_limits;
mod clients;
mod filters;
mod forwarding;
mod fuzz_corpus;
mod helpers;
mod hostile_input;
mod keepalive;
mod key_pool;
mod limits;
mod models;
mod observability;
mod process;
mod providers;
mod redis_server;
mod reload;
mod runtime;
mod shared_state;
mod shutdown;
mod streaming;
mod tls;
mod upstream_faults;
mod websocket;
