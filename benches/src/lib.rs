//! Criterion benches for tiered-cache live in `benches/`.
