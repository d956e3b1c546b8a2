//! The proto3 JSON mapping (<https://protobuf.dev/programming-guides/json/>)
//! of the API's messages, from the same descriptor set as gRPC reflection:
//! lowerCamelCase field names (the proto names are accepted too), 64-bit
//! integers as strings, `Timestamp` as RFC 3339, `Duration` as `"1.5s"`,
//! enums by name, fields at their default value left out. Unknown fields
//! are refused, as the mapping's parsers do by default.

use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};
use tonic::Status;

use crate::proto;

/// The API's message descriptors, for JSON in and out.
#[derive(Debug, Clone)]
pub struct JsonCodec {
    pool: DescriptorPool,
    serialize: SerializeOptions,
}

/// The descriptor set compiled into the binary does not describe the API
/// (a build defect).
#[derive(Debug, thiserror::Error)]
#[error("the API descriptor set is unusable: {0}")]
pub struct DescriptorError(String);

impl DescriptorError {
    /// An error saying `why`.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl JsonCodec {
    /// The codec for `herald.v1`, from the compiled-in descriptor set.
    pub fn new() -> Result<Self, DescriptorError> {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| DescriptorError(e.to_string()))?;
        Ok(Self {
            pool,
            serialize: SerializeOptions::new(),
        })
    }

    /// The API's descriptors.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The descriptor of the message `full_name` (e.g.
    /// `herald.v1.SendNotificationRequest`).
    pub fn descriptor(&self, full_name: &str) -> Result<MessageDescriptor, Status> {
        self.pool.get_message_by_name(full_name).ok_or_else(|| {
            tracing::error!(full_name, "message missing from the descriptor set");
            Status::internal("internal error")
        })
    }

    /// The request and response descriptors of `herald.v1.Notifications`'
    /// method `method` (e.g. `SendNotification`); `None` if there is none.
    pub fn method(&self, method: &str) -> Option<(MessageDescriptor, MessageDescriptor)> {
        self.pool
            .get_service_by_name("herald.v1.Notifications")?
            .methods()
            .find(|m| m.name() == method)
            .map(|m| (m.input(), m.output()))
    }

    /// Parses `json` as the message `full_name` into `T` (the same
    /// message's generated type). Errors: `INVALID_ARGUMENT`, the message
    /// starting with the JSON path of the offending field (e.g.
    /// `recipients[1]: invalid type: integer, expected a string`), or with
    /// where the text stopped being JSON.
    pub fn decode<T: Message + Default>(&self, full_name: &str, json: &[u8]) -> Result<T, Status> {
        self.decode_as(self.descriptor(full_name)?, json)
    }

    /// [`Self::decode`] with the message's descriptor.
    pub fn decode_as<T: Message + Default>(
        &self,
        desc: MessageDescriptor,
        json: &[u8],
    ) -> Result<T, Status> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let mut track = serde_path_to_error::Track::new();
        let parsed = DynamicMessage::deserialize_with_options(
            desc,
            serde_path_to_error::Deserializer::new(&mut de, &mut track),
            &DeserializeOptions::new(),
        )
        .and_then(|m| de.end().map(|()| m));
        let message = parsed.map_err(|e| {
            let path = track.path().to_string();
            Status::invalid_argument(match path.trim_start_matches('.') {
                _ if e.is_syntax() || e.is_eof() => format!("invalid JSON: {e}"),
                "" => e.to_string(),
                field => format!("{field}: {e}"),
            })
        })?;
        message
            .transcode_to::<T>()
            .map_err(|e| Status::invalid_argument(format!("invalid message: {e}")))
    }

    /// `message` (of type `full_name`) as JSON text.
    pub fn encode<T: Message>(&self, full_name: &str, message: &T) -> Result<Vec<u8>, Status> {
        self.encode_bytes(full_name, &message.encode_to_vec())
    }

    /// The binary protobuf `bytes` of message `full_name` as JSON text.
    pub fn encode_bytes(&self, full_name: &str, bytes: &[u8]) -> Result<Vec<u8>, Status> {
        self.encode_bytes_as(self.descriptor(full_name)?, bytes)
    }

    /// [`Self::encode_bytes`] with the message's descriptor.
    pub fn encode_bytes_as(
        &self,
        desc: MessageDescriptor,
        bytes: &[u8],
    ) -> Result<Vec<u8>, Status> {
        self.to_json(&Self::decode_dynamic(desc, bytes)?)
    }

    /// The binary protobuf `bytes` of a message of ours, decoded once (for
    /// reading its fields and writing it as JSON).
    pub fn decode_dynamic(desc: MessageDescriptor, bytes: &[u8]) -> Result<DynamicMessage, Status> {
        let full_name = desc.full_name().to_owned();
        DynamicMessage::decode(desc, bytes).map_err(|e| {
            tracing::error!(error = %e, full_name, "cannot re-read our own encoding");
            Status::internal("internal error")
        })
    }

    /// `message` as JSON text.
    pub fn to_json(&self, message: &DynamicMessage) -> Result<Vec<u8>, Status> {
        let mut out = serde_json::Serializer::new(Vec::with_capacity(256));
        message
            .serialize_with_options(&mut out, &self.serialize)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot write JSON");
                Status::internal("internal error")
            })?;
        Ok(out.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> JsonCodec {
        JsonCodec::new().unwrap()
    }

    #[test]
    fn requests_parse_by_json_or_proto_field_names() {
        let r: proto::SendNotificationRequest = codec()
            .decode(
                "herald.v1.SendNotificationRequest",
                br#"{"recipients":["a"],"type":"t","title":"x","idempotencyKey":"k"}"#,
            )
            .unwrap();
        assert_eq!(r.recipients, ["a"]);
        assert_eq!(r.idempotency_key, "k");
        let r: proto::SendNotificationRequest = codec()
            .decode(
                "herald.v1.SendNotificationRequest",
                br#"{"idempotency_key":"k"}"#,
            )
            .unwrap();
        assert_eq!(r.idempotency_key, "k");
    }

    #[test]
    fn bad_json_is_invalid_argument_naming_the_field() {
        let c = codec();
        let name = "herald.v1.SendNotificationRequest";
        for (json, starts) in [
            (&br#"{"recipients":["a",5]}"#[..], "recipients[1]: "),
            (br#"{"title":7}"#, "title: "),
            (br#"{"title":"x""#, "invalid JSON: "),
            (br#"{"title":"x"} trailing"#, "invalid JSON: "),
            (b"", "invalid JSON: "),
        ] {
            let e = c
                .decode::<proto::SendNotificationRequest>(name, json)
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().starts_with(starts),
                "{}: {}",
                String::from_utf8_lossy(json),
                e.message()
            );
        }
        let e = c
            .decode::<proto::SendNotificationRequest>(name, br#"{"nope":1}"#)
            .unwrap_err();
        assert!(e.message().contains("nope"), "{}", e.message());
    }

    #[test]
    fn responses_follow_the_mapping() {
        let json = codec()
            .encode(
                "herald.v1.SendNotificationResponse",
                &proto::SendNotificationResponse {
                    deliveries: vec![proto::Delivery {
                        recipient: "a".into(),
                        notification_id: 7,
                        seq: 3,
                        updated: false,
                    }],
                    scheduled: false,
                },
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"deliveries":[{"recipient":"a","notificationId":"7","seq":"3"}]}"#
        );
    }
}
