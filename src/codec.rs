//! The protobuf codec of the generated service and clients: prost, with a
//! small initial buffer.
//!
//! tonic's default codec buffer is 8 KiB per call, allocated up front; a
//! `Subscribe` stream is a call that lives for hours, mostly idle, so that
//! buffer alone was a third of an idle stream's memory. Starting at 512
//! bytes (it grows when a message needs more) keeps idle streams small;
//! the yield threshold stays tonic's default.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer per call, bytes.
pub const INITIAL_BUFFER_BYTES: usize = 512;
/// Encoded bytes after which a stream yields to let HTTP/2 flush (tonic's
/// default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// `ProstCodec` with [`INITIAL_BUFFER_BYTES`] buffers.
#[derive(Debug, Clone, Default)]
pub struct HeraldCodec<T, U>(std::marker::PhantomData<(T, U)>);

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for HeraldCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
