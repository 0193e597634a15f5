//! What operators see of each request: the access line, request ids, metrics and the log setup;
//! and the reload of what can change at run time.

pub mod access;
pub mod activity;
pub mod exchange;
pub mod logging;
pub mod metrics;
pub mod request_id;
