//! `cargo fuzz run classifier`: the reference classifier on arbitrary frames under a
//! fuzzer-chosen policy must never panic, and must keep its invariants (see
//! `p25_fuzz::classifier`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p25_fuzz::classifier(data));
