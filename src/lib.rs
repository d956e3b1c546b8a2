//! Herald: a gRPC streaming notification service.
//!
//! See `ARCHITECTURE.md` for the map. The binary (`src/main.rs`) is a thin
//! CLI over this library, so tests and benchmarks run the real server
//! in-process.

#![warn(missing_docs)]

pub mod hub;
pub mod jobs;
pub mod limits;
pub mod notification;
pub mod store;

/// Code generated from `proto/herald/v1/herald.proto` (package `herald.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("herald.v1");
    // The server, generated in a second pass that sends `Event`s as
    // pre-encoded `crate::wire::WireEvent`s (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/server/herald.v1.rs"));

    /// Encoded `FileDescriptorSet` of the API, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));
}

pub mod api;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod codec;
pub mod config;
pub mod health;
pub mod http;
pub mod server;
pub mod subscription;
pub mod telemetry;
pub mod ticket;
pub mod transport;
pub mod wire;
