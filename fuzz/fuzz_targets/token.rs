//! Fuzz target `token`: see `cartedge::fuzzing::token` for the input shape and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cartedge::fuzzing::token(data));
