//! Generates the registry.v1 gRPC code from `proto/` with protox (no system protoc needed).
//! Messages and client code always; server traits with the `server` feature (used by
//! registry-api), generated apart so that Discover can answer with pre-encoded instances. The
//! encoded descriptor set is written too, for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    let descriptors = protox::compile(
        [proto_root.join("registry/v1/registry.proto")],
        [proto_root.as_path()],
    )?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("registry_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors.clone())?;
    if std::env::var_os("CARGO_FEATURE_SERVER").is_some() {
        // The server traits alone, on the types above, except that Discover answers with
        // `proto::wire::EncodedDiscoverResponse`: the same bytes on the wire, built from
        // instances the server encoded once instead of on every call. `ServerCodec` writes
        // each response into a buffer of its exact size.
        let server_dir = out_dir.join("server");
        std::fs::create_dir_all(&server_dir)?;
        tonic_prost_build::configure()
            .build_client(false)
            .build_server(true)
            .out_dir(&server_dir)
            .codec_path("crate::proto::wire::ServerCodec")
            .extern_path(".registry.v1", "crate::proto")
            .extern_path(
                ".registry.v1.DiscoverResponse",
                "crate::proto::wire::EncodedDiscoverResponse",
            )
            .compile_fds(descriptors)?;
    }
    Ok(())
}
