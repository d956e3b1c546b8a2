//! Domain values → wire messages.

use crate::{
    notification::{Action, Delivery, Epoch, EventBody, Notification, StreamEvent},
    proto,
};

impl From<&Notification> for proto::Notification {
    fn from(n: &Notification) -> Self {
        Self {
            id: n.id,
            seq: n.seq,
            recipient: n.recipient.clone(),
            r#type: n.content.kind.clone(),
            title: n.content.title.clone(),
            body: n.content.body.clone(),
            data: n.content.data.clone(),
            created_at: Some(n.content.created_at.into()),
            read: n.read_at.is_some(),
            category: n.content.presentation.category.clone(),
            severity: n.content.presentation.severity.to_proto() as i32,
            actor: n.content.presentation.actor.clone(),
            action_url: n.content.presentation.action_url.clone(),
            actions: n
                .content
                .presentation
                .actions
                .iter()
                .map(Into::into)
                .collect(),
            read_at: n.read_at.map(Into::into),
            seen_at: n.seen_at.map(Into::into),
            archived_at: n.archived_at.map(Into::into),
            replace_key: n.content.replace_key.clone(),
            group_key: n.content.group_key.clone(),
            group_count: n.group.as_ref().map_or(0, |g| g.count),
            actors: n.group.as_ref().map_or_else(Vec::new, |g| g.actors.clone()),
            expires_at: n.content.expires_at.map(Into::into),
        }
    }
}

impl From<&Action> for proto::Action {
    fn from(a: &Action) -> Self {
        Self {
            label: a.label.clone(),
            url: a.url.clone(),
        }
    }
}

impl From<&StreamEvent> for proto::Event {
    fn from(e: &StreamEvent) -> Self {
        let kind = match &e.body {
            EventBody::Notification(n) => proto::event::Kind::Notification(n.into()),
            EventBody::Updated(n) => proto::event::Kind::Updated(n.into()),
            EventBody::State(r) if r.is_plain_read() => {
                proto::event::Kind::Read(proto::ReadStateChanged {
                    notification_ids: r.ids.clone(),
                    up_to_seq: r.up_to_seq,
                })
            }
            EventBody::State(r) => proto::event::Kind::State(proto::StateChanged {
                action: r.action.to_proto() as i32,
                notification_ids: r.ids.clone(),
                up_to_seq: r.up_to_seq,
                filter: r.filter.as_ref().map(|f| f.to_proto()),
            }),
        };
        Self {
            seq: e.seq,
            kind: Some(kind),
            epoch: e.epoch,
        }
    }
}

impl From<Delivery> for proto::Delivery {
    fn from(d: Delivery) -> Self {
        Self {
            recipient: d.recipient,
            notification_id: d.notification_id,
            seq: d.seq,
            updated: d.updated,
        }
    }
}

/// A control event (caught-up, heartbeat, resync) at stream position
/// `seq` of `epoch`.
pub fn control(seq: u64, epoch: Epoch, kind: proto::event::Kind) -> proto::Event {
    proto::Event {
        seq,
        kind: Some(kind),
        epoch,
    }
}
