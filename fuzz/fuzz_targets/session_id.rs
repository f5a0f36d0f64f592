//! Fuzz target `session_id`: see `cartedge::fuzzing::session_id` for the input shape and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cartedge::fuzzing::session_id(data));
