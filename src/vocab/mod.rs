//! Words that several floors of the proxy share, at the bottom of the layering: what kind of
//! endpoint a request is for, the token usage an answer reports, where a client stands against
//! its limits, whether a request is a WebSocket upgrade, whether an error is a lack of file
//! descriptors, which models an upstream serves and what their tokens cost. Nothing here names a module
//! above it (config, auth, policy, proxy, routes, ops, server), so every floor may use it.

pub mod calendar;
pub mod descriptors;
pub mod endpoint;
pub mod models;
pub mod price;
pub mod standing;
pub mod usage;
pub mod websocket;

pub use endpoint::{Endpoint, Model, Route, Shape, classify};
pub use models::{ModelPattern, ModelPatterns};
pub use price::{Nanos, Price, PriceTable};
pub use usage::Usage;
