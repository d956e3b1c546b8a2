//! Compiles `proto/` to Rust with a pure-Rust protobuf compiler (no system
//! `protoc`), and writes the encoded descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/herald/v1/herald.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("herald_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers for long-lived idle streams (src/codec.rs).
        .codec_path("crate::codec::HeraldCodec")
        .compile_fds(fds)?;
    Ok(())
}
