//! Compiles `proto/` to Rust with a pure-Rust protobuf compiler (no system
//! `protoc`), and writes the encoded descriptor set for gRPC reflection.
//!
//! Two passes: the messages and the client as usual; then the server alone,
//! with the messages taken from the first pass except `Event`, which the
//! server sends as pre-encoded bytes (`crate::wire::WireEvent`) so that an
//! event is encoded once however many streams it goes to.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/herald/v1/herald.proto";
    println!("cargo:rerun-if-changed={proto}");
    // The migrations are embedded at compile time: a new file must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("herald_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers for long-lived idle streams (src/codec.rs).
        .codec_path("crate::codec::HeraldCodec")
        .build_server(false)
        .compile_fds(fds.clone())?;
    let server = out.join("server");
    fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::HeraldCodec")
        .build_client(false)
        .extern_path(".herald.v1", "crate::proto")
        .extern_path(".herald.v1.Event", "crate::wire::WireEvent")
        .out_dir(&server)
        .compile_fds(fds)?;
    Ok(())
}
