//! An OpenAI-compatible API proxy: checks the caller's token, swaps in the upstream key, forwards
//! requests and streams byte for byte, and caches the model list.
//!
//! # Layout
//!
//! The folders follow a request through the proxy:
//!
//! 1. [`config`]: before any request, the environment and `.env` files are read, validated and
//!    parsed once (base URL, upstream key header, token sets); secrets are wrapped so they
//!    cannot be printed.
//! 2. [`server`]: the accept loop takes the connection (`TCP_NODELAY`, header timeout), admission
//!    refuses what is over `MAX_CONCURRENT_REQUESTS`, and the drain ends it all on shutdown.
//! 3. [`ops`]: the request gets its id and an access record, which writes the access line and
//!    the metrics when the response's last byte has gone.
//! 4. [`routes`]: the warp route table, dispatching on the request's [`vocab::Endpoint`]: its
//!    one classification, made by the server from its canonical path before admission, which
//!    every later stage reads.
//! 5. [`auth`]: after its path matched, the route checks the caller's token and learns the
//!    caller's label; all masking of secrets lives here too.
//! 6. [`policy`]: for a client from the clients file, the model it asks for is checked against
//!    its list (an endpoint that generates without naming one is refused unless the client's
//!    `endpoints` allows it), and the request is charged against its limits (an estimate
//!    first, settled from the answer's `usage` when it ends; for a dollar budget, its dearest
//!    cost among the upstreams it may go to, settled at what it cost), or refused with 429
//!    before anything goes upstream. When the answer ends, its usage is priced (by the upstream
//!    that served it and the model it was served as) and the cost counted in the spend ledger
//!    ([`policy::ledger`]) and the metrics.
//! 7. [`proxy`]: the [`proxy::Upstream`] handle sends the request with a key from the pool
//!    ([`proxy::keys`]) swapped in, on to the next key after a rate limit (a key answered 401 is
//!    probed alone before it is taken out), and shapes the answer: headers cleaned, the body
//!    passed through adapters (idle watchdog with SSE keep-alive, usage tap, key mask) as it
//!    streams, or the model list served from its cache.
//! 8. [`error`]: every answer the proxy makes itself, in one table.
//!
//! Beside the request path, [`reload`] re-reads the clients file and the token settings on
//! `SIGHUP` or a change of the file, and swaps them in whole.
//!
//! Beside the path, [`shared`] holds the state replicas share through Redis (`REDIS_URL`): the
//! key pool announces its rests to the other replicas over pub/sub and merges them there in the
//! background, so no request waits for it; when Redis is
//! slow or down the mode turns `local` and each replica decides alone until Redis answers.
//!
//! Beneath them all, [`vocab`] holds the words several floors share (the endpoint a request is
//! for, the token usage an answer reports, where a client stands against its limits, what a
//! WebSocket upgrade is, what running out of descriptors looks like) and names none of the
//! modules above.
//!
//! [`state::AppState`] is where these parts are put together; each route hands its handler only
//! the part it needs.
//! # Floors
//!
//! Imports run one way: a module names only the modules on the floors below its own, never one
//! on its floor or above, so `src/` has no import cycle between its folders
//! (`tests/api/layering.rs` reads this list and every `crate::` path in `src/` to keep it so).
//!
//! 1. `vocab`: the words several floors share
//! 2. `config`: settings, parsed once
//! 3. `error`: every answer the proxy makes itself
//! 4. `ops`: ids, access line, metrics, logging
//! 5. `shared`: the Redis handle and its mode
//! 6. `auth`: tokens and masking
//! 7. `policy`: per-client limits
//! 8. `proxy`: the upstream
//! 9. `reload`: the clients file and token settings swapped in on a change
//! 10. `state`: where the parts are put together
//! 11. `routes`: the route table
//! 12. `server`: the listener, admission and drain
//! 13. `cli`: the command line
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod ops;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod server;
pub mod shared;
pub mod state;
pub mod vocab;

pub use config::Config;
pub use routes::routes;
pub use server::serve;
pub use state::AppState;
