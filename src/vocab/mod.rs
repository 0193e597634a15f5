//! Words that several floors of the proxy share, at the bottom of the layering: what kind of
//! endpoint a request is for, and the token usage an answer reports. Nothing here names a module
//! above it (config, auth, policy, proxy, routes, ops, server), so every floor may use it.

pub mod endpoint;
pub mod usage;

pub use endpoint::{Endpoint, Model, Route, Shape, classify};
pub use usage::Usage;
