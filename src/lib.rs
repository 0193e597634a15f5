//! An OpenAI-compatible API proxy: checks the caller's token, swaps in the upstream key, forwards
//! requests and streams byte for byte, and caches the model list.

pub mod access;
pub mod auth;
pub mod config;
pub mod error;
pub mod exchange;
mod filters;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod models_cache;
pub mod secret;
pub mod server;
pub mod state;
pub mod streams;
pub mod upstream;
pub mod usage;

pub use config::Config;
pub use filters::routes;
pub use server::serve;
pub use state::AppState;
