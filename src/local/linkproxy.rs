//! The userspace link proxy that emulates inter-region latency and partitions (being written).
