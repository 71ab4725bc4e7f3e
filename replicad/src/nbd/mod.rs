//! The NBD server: serves exports to real NBD clients over TCP or unix sockets.
//!
//! - [`proto`]: constants and a pure codec of the wire format (no I/O).

pub mod proto;
