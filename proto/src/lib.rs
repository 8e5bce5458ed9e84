//! The wire contracts of internal-tcp-watcher, compiled for both binaries.
//!
//! - [`externalscaler`]: KEDA's external scaler service, wire-exact with KEDA's
//!   own copy of `externalscaler.proto`.
//! - [`itw::v1`]: the agent -> scaler `Report` stream (see
//!   `proto/itw/v1/ingest.proto` for its rules) and the read-only
//!   `itw.v1.Graph` service (`proto/itw/v1/graph.proto`).
//! - [`names`]: the Kubernetes name rules of what the agent reports and the
//!   scaler accepts, one copy for both.
//! - [`token`]: the bearer token rule and the check of a presented token,
//!   one copy for every binary.
//! - [`addr`]: `host:port` settings (`SCALER_ADDR`), one parsing rule.
//! - [`codec`]: the protobuf codec every generated client and server uses
//!   (prost's, with small per-call buffers).
//! - [`window`]: the HTTP/2 connection window of the ingest listeners, one
//!   rule for the scaler and the relay.
//!
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

pub mod itw {
    pub mod v1 {
        tonic::include_proto!("itw.v1");

        /// The ingest protocol version this build speaks (`Hello.protocol_version`).
        pub const PROTOCOL_VERSION: u32 = 1;

        /// The request header of a Report stream sent to a relay: the scaler
        /// replica it is for, as the agent resolved it (`SocketAddr` text:
        /// `10.244.1.5:9090`, `[fd00::5]:9090`).
        pub const REPLICA_HEADER: &str = "itw-replica";
    }
}

pub mod addr;
pub mod codec;
pub mod names;
pub mod token;
pub mod window;

/// Encoded `FileDescriptorSet` of every contract, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptors");
