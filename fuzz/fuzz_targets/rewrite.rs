//! Request-to-upstream rewriting (URL, request and response headers) against its invariants;
//! see `llm_proxy::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| llm_proxy::fuzzing::check_rewrite(data));
