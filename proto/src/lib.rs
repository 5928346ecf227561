//! The `mdm.v1` API contract, generated from `proto/mdm/v1/*.proto`.
//!
//! Only the gRPC edge of the server and the agent use these types; domain
//! code converts them at the boundary.

pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("mdm.v1");
}

/// Encoded `FileDescriptorSet` of every `mdm.v1` file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mdm_descriptor");
