//! Fuzz target `request`: see `cartedge::fuzzing::request` for the input shape and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cartedge::fuzzing::request(data));
