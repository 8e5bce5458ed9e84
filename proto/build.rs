//! Compiles the contracts with a vendored `protoc`, so a machine with nothing
//! installed by hand builds them.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "externalscaler.proto",
    "itw/v1/ingest.proto",
    "itw/v1/graph.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .file_descriptor_set_path(out.join("descriptors.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    Ok(())
}
