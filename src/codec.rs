//! The protobuf codec of the generated service and clients: prost, with a
//! small initial buffer, and undecodable messages as INVALID_ARGUMENT.
//!
//! tonic's default codec buffer is 8 KiB per call, allocated up front; a
//! `Subscribe` stream is a call that lives for hours, mostly idle, so that
//! buffer alone was a third of an idle stream's memory. Starting at 512
//! bytes (it grows when a message needs more) keeps idle streams small;
//! the yield threshold stays tonic's default.
//!
//! `tonic_prost::ProstDecoder` reports a message prost cannot decode
//! (truncated, invalid UTF-8 in a string field, a bad wire type) as
//! INTERNAL, following the gRPC status-code guide; but a request body is the
//! caller's input, and the API (`herald.proto`) promises INVALID_ARGUMENT
//! for bad input, with the offending field named. [`HeraldDecoder`] decodes
//! with prost itself, so it still has the typed `prost::DecodeError` to
//! word the status from. The generated clients share this codec, so a
//! response they cannot decode is INVALID_ARGUMENT to them too; a Herald
//! server never sends one.

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

/// Initial encode/decode buffer per call, bytes.
pub const INITIAL_BUFFER_BYTES: usize = 512;
/// Encoded bytes after which a stream yields to let HTTP/2 flush (tonic's
/// default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// `ProstCodec` with [`INITIAL_BUFFER_BYTES`] buffers, decoding with
/// [`HeraldDecoder`].
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
    type Decoder = HeraldDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        HeraldDecoder(std::marker::PhantomData)
    }
}

/// Decodes one `U` per message with prost, like `ProstDecoder`, with
/// [`INITIAL_BUFFER_BYTES`] buffers. Fails with INVALID_ARGUMENT when the
/// bytes are not a valid `U`; the status message names the field and the
/// problem, e.g. `invalid protobuf message: SendNotificationRequest.title:
/// invalid string value: data is not UTF-8 encoded`.
#[derive(Debug, Clone, Default)]
pub struct HeraldDecoder<U>(std::marker::PhantomData<U>);

impl<U> Decoder for HeraldDecoder<U>
where
    U: Message + Default,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(src)
            .map(Some)
            .map_err(crate::api::status::undecodable)
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
