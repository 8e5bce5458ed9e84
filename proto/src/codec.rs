//! The protobuf codec of every service here: prost's encoding, byte for byte
//! on the wire, with smaller per-call buffers than tonic's default.
//!
//! tonic allocates an encode and a decode buffer of 8 KiB up front for every
//! call and keeps them for the call's life. Every agent keeps one Report
//! stream open to every scaler replica, and KEDA one StreamIsActive stream
//! per external-push trigger, so at 5,000 nodes those buffers alone would be
//! 80 MiB of a replica. The messages of these streams are small (an ack is a
//! dozen bytes, a steady batch about a kilobyte); a larger one (a snapshot)
//! grows its buffer as it needs, so the size only sets the floor.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes allocated up front for each call's encode and decode buffers.
pub const CALL_BUFFER_BYTES: usize = 1024;
/// tonic's default: ready messages are batched into one write up to this.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// prost's codec with [`CALL_BUFFER_BYTES`] buffers (the generated clients
/// and servers name it through `codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder, Encoder};

    use super::*;
    use crate::itw::v1::{ReportRequest, ReportResponse};

    #[test]
    fn both_directions_start_with_small_buffers() {
        let mut codec = SmallBufferCodec::<ReportResponse, ReportRequest>::default();
        // BufferSettings keeps its fields private; its Debug form shows them.
        let expected = "BufferSettings { buffer_size: 1024, yield_threshold: 32768 }";
        assert_eq!(format!("{:?}", codec.encoder().buffer_settings()), expected);
        assert_eq!(format!("{:?}", codec.decoder().buffer_settings()), expected);
    }
}
