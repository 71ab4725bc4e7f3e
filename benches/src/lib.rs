//! Shared helpers for the criterion benches (kept empty on purpose).
