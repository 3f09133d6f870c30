//! Fuzz target `jwt`: the checks are in fuzz/src/lib.rs (`mbws_fuzz::jwt`), shared with the
//! regression test that replays kept inputs under plain `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mbws_fuzz::jwt(data));
