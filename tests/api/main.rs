//! Integration tests: the proxy on a real listener, a mock upstream on 127.0.0.1.

mod admin;
mod auth;
mod budget;
mod clients;
mod filters;
mod forwarding;
mod fuzz_corpus;
mod hardening;
mod helpers;
mod limits;
mod models;
mod observability;
mod process;
mod reload;
mod streaming;
