//! `cargo fuzz run policy`: the policy parser on arbitrary bytes must never panic, and a
//! rejection must always point inside the file (see `p25_fuzz::policy`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p25_fuzz::policy(data));
