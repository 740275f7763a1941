//! `cargo fuzz run control`: p25d's control request handler on arbitrary bytes must never
//! panic, answer well-formed JSON lines, and keep the maps equal to the policy plus the
//! runtime entries (see `p25_fuzz::control`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p25_fuzz::control(data));
