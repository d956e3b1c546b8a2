//! Events as the server sends them: protobuf bytes encoded once and shared.
//!
//! The server side of `Subscribe` streams [`WireEvent`]s, bytes that are
//! already a complete `herald.v1.Event` message (`build.rs` maps `Event` to
//! this type for the server only; clients decode the generated `Event`). A
//! stored event is encoded once per replica, and the bytes are shared by
//! every stream of its user there. For a send to many recipients, the
//! fields the recipients share (type, title, body, data, created_at) are
//! encoded once, and each recipient's event is its own id, seq and
//! recipient followed by those bytes: protobuf parsers accept fields in any
//! order (Protocol Buffers encoding guide, "Field Order").

use bytes::{BufMut, Bytes, BytesMut};
use prost::{
    Message,
    encoding::{self, WireType},
};

use crate::{
    notification::{Content, Epoch, Group, StreamEvent},
    proto,
};

/// A complete, encoded `herald.v1.Event`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WireEvent(pub Bytes);

impl std::fmt::Debug for WireEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WireEvent({} bytes)", self.0.len())
    }
}

impl WireEvent {
    /// Encodes a control or backlog event (not shared).
    pub fn encode(event: &proto::Event) -> Self {
        Self(event.encode_to_vec().into())
    }
}

impl Message for WireEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// The server never decodes events; a decoder would skip every field.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The encoded fields of a new notification that all its recipients
/// share: everything but id, seq and recipient (fields 1–3 of
/// `herald.v1.Notification`) and the recipient's state (absent in events):
/// the content, and with a group key the group as its send opens it.
pub fn shared_fields(content: &Content) -> Bytes {
    let group = (!content.group_key.is_empty()).then(|| Group::open(&content.presentation.actor));
    proto::Notification {
        r#type: content.kind.clone(),
        title: content.title.clone(),
        body: content.body.clone(),
        data: content.data.clone(),
        created_at: Some(content.created_at.into()),
        category: content.presentation.category.clone(),
        severity: content.presentation.severity.to_proto() as i32,
        actor: content.presentation.actor.clone(),
        action_url: content.presentation.action_url.clone(),
        actions: content
            .presentation
            .actions
            .iter()
            .map(Into::into)
            .collect(),
        replace_key: content.replace_key.clone(),
        group_key: content.group_key.clone(),
        group_count: group.as_ref().map_or(0, |g| g.count),
        actors: group.map_or_else(Vec::new, |g| g.actors),
        expires_at: content.expires_at.map(Into::into),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// A notification event for one recipient: `Event { seq, notification:
/// { id, seq, recipient, <shared> }, epoch }`, built from [`shared_fields`]
/// without re-encoding them.
pub fn notification_event(
    seq: u64,
    epoch: Epoch,
    id: i64,
    recipient: &str,
    shared: &[u8],
) -> Bytes {
    let mut own = BytesMut::with_capacity(24 + recipient.len());
    if id != 0 {
        encoding::int64::encode(1, &id, &mut own);
    }
    if seq != 0 {
        encoding::uint64::encode(2, &seq, &mut own);
    }
    if !recipient.is_empty() {
        encoding::encode_key(3, WireType::LengthDelimited, &mut own);
        encoding::encode_varint(recipient.len() as u64, &mut own);
        own.put_slice(recipient.as_bytes());
    }
    let inner_len = own.len() + shared.len();
    let mut out = BytesMut::with_capacity(inner_len + 16);
    if seq != 0 {
        encoding::uint64::encode(1, &seq, &mut out);
    }
    encoding::encode_key(2, WireType::LengthDelimited, &mut out);
    encoding::encode_varint(inner_len as u64, &mut out);
    out.put_slice(&own);
    out.put_slice(shared);
    if epoch != 0 {
        encoding::uint64::encode(7, &epoch, &mut out);
    }
    out.freeze()
}

/// The encoding of a stored event, computed once and shared by every
/// stream it reaches on this replica (see [`StreamEvent::encoded`]).
pub fn encode_stream_event(event: &StreamEvent) -> Bytes {
    proto::Event::from(event).encode_to_vec().into()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::notification::{EventBody, Notification};

    #[test]
    fn a_shared_encoding_decodes_to_the_same_event() {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        for (seq, epoch, id, recipient) in [
            (1, 42, 7, "alice"),
            (300, crate::notification::MAX_EPOCH, 123_456_789, "bob-ü"),
            (0, 0, 0, ""),
        ] {
            let n = Notification {
                id,
                seq,
                recipient: recipient.into(),
                content: std::sync::Arc::new(Content {
                    kind: "build.passed".into(),
                    title: "Build #41 passed".into(),
                    body: "".into(),
                    data: r#"{"a":[1,2]}"#.into(),
                    presentation: crate::notification::Presentation {
                        category: if id == 0 {
                            String::new()
                        } else {
                            "builds".into()
                        },
                        severity: crate::notification::Severity::Critical,
                        actor: "ci".into(),
                        action_url: "/b/41".into(),
                        actions: vec![crate::notification::Action {
                            label: "Open".into(),
                            url: "https://ci.example.com/41".into(),
                        }],
                    },
                    created_at: at,
                    replace_key: if id == 123_456_789 {
                        "order-9".into()
                    } else {
                        String::new()
                    },
                    group_key: if id == 7 {
                        "pr-41".into()
                    } else {
                        String::new()
                    },
                    expires_at: (id == 7).then(|| at + Duration::from_secs(3600)),
                }),
                read_at: None,
                seen_at: None,
                archived_at: None,
                // A new notification's group is the one its send opens.
                group: (id == 7).then(|| crate::notification::Group::open("ci")),
            };
            let event = StreamEvent::new(seq, epoch, EventBody::Notification(n.clone()));
            let shared = shared_fields(&n.content);
            let bytes = notification_event(seq, epoch, id, recipient, &shared);
            let decoded = proto::Event::decode(bytes.as_ref()).unwrap();
            assert_eq!(decoded, proto::Event::from(&event));
            let direct = proto::Event::decode(encode_stream_event(&event).as_ref()).unwrap();
            assert_eq!(decoded, direct);
        }
    }

    #[test]
    fn a_stream_event_is_encoded_once_and_its_bytes_shared() {
        let event = StreamEvent::new(
            3,
            7,
            EventBody::State(crate::notification::StateChange {
                action: crate::notification::StateAction::Read,
                ids: vec![1, 2],
                up_to_seq: 0,
                filter: None,
            }),
        );
        let first = event.encoded();
        let second = event.encoded();
        assert_eq!(
            first.as_ptr(),
            second.as_ptr(),
            "the same buffer, not a re-encoding"
        );
        assert_eq!(
            proto::Event::decode(first.as_ref()).unwrap(),
            proto::Event::from(&event)
        );
    }

    #[test]
    fn wire_event_writes_its_bytes_verbatim() {
        let e = proto::Event {
            seq: 9,
            kind: Some(proto::event::Kind::CaughtUp(proto::CaughtUp::default())),
            epoch: 5,
        };
        let wire = WireEvent::encode(&e);
        assert_eq!(wire.encode_to_vec(), e.encode_to_vec());
        assert_eq!(wire.encoded_len(), e.encoded_len());
    }
}
