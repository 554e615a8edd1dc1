//! Client SDK for the service registry.
//!
//! [`proto`] holds the `registry.v1` gRPC types and client generated from `proto/`; the
//! provider and consumer helpers build on it.

#![forbid(unsafe_code)]

/// The `registry.v1` protobuf types and gRPC client (and server traits with the `server`
/// feature), generated from `proto/registry/v1/registry.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("registry.v1");

    /// Encoded `FileDescriptorSet` of `registry.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/registry_descriptor.bin"));
}
