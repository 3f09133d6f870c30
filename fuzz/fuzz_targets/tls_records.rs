//! Fuzz target `tls_records`: the checks are in fuzz/src/lib.rs (`mbws_fuzz::tls_records`), shared with the
//! regression test that replays kept inputs under plain `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mbws_fuzz::tls_records(data));
