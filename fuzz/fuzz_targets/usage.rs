//! The usage scanner over arbitrary upstream bytes, against its invariants; see
//! `fuzz/invariants/usage.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants/usage.rs"]
mod usage;

fuzz_target!(|data: &[u8]| usage::check_usage(data));
