//! Request-to-upstream rewriting (URL, request and response headers) against its invariants;
//! see `fuzz/invariants/rewrite.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants/rewrite.rs"]
mod rewrite;

fuzz_target!(|data: &[u8]| rewrite::check_rewrite(data));
