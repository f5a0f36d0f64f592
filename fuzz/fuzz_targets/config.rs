//! Fuzz target `config`: see `cartedge::fuzzing::config` for the input shape and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cartedge::fuzzing::config(data));
