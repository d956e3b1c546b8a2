//! Model-based test: random interleavings of sends, marks, state changes
//! (read, unread, seen, archive, unarchive, delete) and resumes, run
//! against a real replica on each store, must produce exactly the streams a
//! simple in-test model says: the same seqs, the same events in the same
//! order, the same state, the same answers and counts.
//!
//! Few cases by default (each starts a replica, and on PostgreSQL creates a
//! database); `PROPTEST_CASES=200 cargo test --release --test model` runs
//! longer.

mod common;

use std::collections::BTreeMap;

use common::*;
use herald::proto::{self, StateAction, event::Kind, mark_read_request::Target};
use proptest::prelude::*;
use tonic::transport::Channel;

const USERS: [&str; 3] = ["ann", "bo", "cy"];

#[derive(Debug, Clone)]
enum Op {
    /// Send to these users (indices into `USERS`, deduplicated, non-empty).
    Send(Vec<usize>),
    /// `user` marks some of its notifications read, picked by these
    /// indices into its notifications (modulo their number).
    MarkIds(usize, Vec<usize>),
    /// `user` marks read up to this fraction of its head (0..=100 %, and
    /// past it).
    MarkUpTo(usize, u64),
    /// `user` resumes after this fraction of its head, and its backlog is
    /// checked.
    Resume(usize, u64),
    /// `user` applies `ACTIONS[action]` (UpdateState) to some of its
    /// notifications by these indices, or (no indices) up to this fraction
    /// of its head.
    Change(usize, usize, Vec<usize>, u64),
}

const ACTIONS: [StateAction; 6] = [
    StateAction::Read,
    StateAction::Unread,
    StateAction::Seen,
    StateAction::Archive,
    StateAction::Unarchive,
    StateAction::Delete,
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::btree_set(0..USERS.len(), 1..=USERS.len())
            .prop_map(|s| Op::Send(s.into_iter().collect())),
        2 => (0..USERS.len(), prop::collection::vec(0usize..50, 1..4))
            .prop_map(|(u, picks)| Op::MarkIds(u, picks)),
        1 => (0..USERS.len(), 0u64..=120).prop_map(|(u, p)| Op::MarkUpTo(u, p)),
        2 => (0..USERS.len(), 0u64..=100).prop_map(|(u, p)| Op::Resume(u, p)),
        3 => (
            0..USERS.len(),
            0..ACTIONS.len(),
            prop::collection::vec(0usize..50, 0..4),
            0u64..=120,
        )
            .prop_map(|(u, a, picks, p)| Op::Change(u, a, picks, p)),
    ]
}

/// What the model says one event is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Note {
        id: i64,
        title: String,
    },
    Read {
        ids: Vec<i64>,
        up_to: u64,
    },
    State {
        action: i32,
        ids: Vec<i64>,
        up_to: u64,
    },
}

/// One notification's state in the model.
#[derive(Debug, Clone, Copy, Default)]
struct Note {
    seq: u64,
    read: bool,
    seen: bool,
    archived: bool,
    deleted: bool,
}

impl Note {
    /// Applies `action`; whether it changed anything (the server's rules:
    /// read implies seen, deleted is final).
    fn apply(&mut self, action: StateAction) -> bool {
        let before = *self;
        match action {
            StateAction::Read => {
                self.read = true;
                self.seen = true;
            }
            StateAction::Unread => self.read = false,
            StateAction::Seen => self.seen = true,
            StateAction::Archive => self.archived = true,
            StateAction::Unarchive => self.archived = false,
            StateAction::Delete => self.deleted = true,
            StateAction::Unspecified => {}
        }
        (before.read, before.seen, before.archived, before.deleted)
            != (self.read, self.seen, self.archived, self.deleted)
    }
}

#[derive(Debug, Default)]
struct Stream {
    events: Vec<Ev>,
    notes: BTreeMap<i64, Note>,
}

impl Stream {
    fn head(&self) -> u64 {
        self.events.len() as u64
    }

    /// Applies `action` to `ids` (or everything up to `up_to`); the event
    /// appended, if anything changed.
    fn change(
        &mut self,
        action: StateAction,
        ids: Option<&[i64]>,
        up_to: u64,
    ) -> Option<(u32, u64)> {
        let up_to = up_to.min(self.head());
        let mut changed = Vec::new();
        for (id, note) in self.notes.iter_mut() {
            let wanted = match ids {
                Some(ids) => ids.contains(id),
                None => note.seq <= up_to,
            };
            if wanted && !note.deleted && note.apply(action) {
                changed.push(*id);
            }
        }
        if changed.is_empty() {
            return None;
        }
        let n = changed.len() as u32;
        let (ids, up_to) = match ids {
            Some(_) => (changed, 0),
            None => (Vec::new(), up_to),
        };
        self.events.push(match action {
            StateAction::Read => Ev::Read { ids, up_to },
            _ => Ev::State {
                action: action as i32,
                ids,
                up_to,
            },
        });
        Some((n, self.head()))
    }

    fn mark(&mut self, ids: Option<&[i64]>, up_to: u64) -> Option<(u32, u64)> {
        self.change(StateAction::Read, ids, up_to)
    }

    /// Ids to name: picks of the user's notifications, or an id that is
    /// not theirs when they have none.
    fn pick(&self, picks: &[usize]) -> Vec<i64> {
        let all: Vec<i64> = self.notes.keys().copied().collect();
        let mut ids: Vec<i64> = if all.is_empty() {
            vec![1]
        } else {
            picks.iter().map(|p| all[p % all.len()]).collect()
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn observed(event: &proto::Event) -> Ev {
    match &event.kind {
        Some(Kind::Notification(n)) => Ev::Note {
            id: n.id,
            title: n.title.clone(),
        },
        Some(Kind::Read(r)) => Ev::Read {
            ids: r.notification_ids.clone(),
            up_to: r.up_to_seq,
        },
        Some(Kind::State(s)) => Ev::State {
            action: s.action,
            ids: s.notification_ids.clone(),
            up_to: s.up_to_seq,
        },
        other => panic!("unexpected event {other:?}"),
    }
}

async fn resume(
    c: &mut herald::proto::notifications_client::NotificationsClient<Channel>,
    user: &str,
    after: u64,
) -> Vec<(u64, Ev)> {
    let mut stream = subscribe(c, user, Some(after)).await;
    let (events, _) = until_caught_up(&mut stream).await;
    events.iter().map(|e| (e.seq, observed(e))).collect()
}

async fn run(backend: Backend, ops: Vec<Op>) {
    let d = Deployment::start(backend, 1).await;
    let mut c = d.client(0).await;
    let mut model: Vec<Stream> = USERS.iter().map(|_| Stream::default()).collect();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Send(to) => {
                let title = format!("n{step}");
                let names: Vec<&str> = to.iter().map(|&u| USERS[u]).collect();
                let sent = send(&mut c, note(&names, &title)).await.unwrap();
                assert_eq!(sent.deliveries.len(), to.len());
                for (&u, d) in to.iter().zip(&sent.deliveries) {
                    let s = &mut model[u];
                    s.events.push(Ev::Note {
                        id: d.notification_id,
                        title: title.clone(),
                    });
                    assert_eq!((d.recipient.as_str(), d.seq), (USERS[u], s.head()));
                    s.notes.insert(
                        d.notification_id,
                        Note {
                            seq: d.seq,
                            ..Note::default()
                        },
                    );
                }
            }
            Op::MarkIds(u, picks) => {
                let s = &mut model[u];
                let ids = s.pick(&picks);
                let got = c
                    .mark_read(authed(
                        proto::MarkReadRequest {
                            target: Some(Target::Ids(proto::NotificationIds { ids: ids.clone() })),
                        },
                        &token(USERS[u], "", ""),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let want = s.mark(Some(&ids), 0).unwrap_or((0, 0));
                assert_eq!((got.marked, got.seq), want, "step {step}: mark ids {ids:?}");
            }
            Op::MarkUpTo(u, percent) => {
                let s = &mut model[u];
                let up_to = (s.head() * percent / 100).max(1);
                let got = c
                    .mark_read(authed(
                        proto::MarkReadRequest {
                            target: Some(Target::UpToSeq(up_to)),
                        },
                        &token(USERS[u], "", ""),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let want = s.mark(None, up_to).unwrap_or((0, 0));
                assert_eq!(
                    (got.marked, got.seq),
                    want,
                    "step {step}: mark up to {up_to}"
                );
            }
            Op::Change(u, action, picks, percent) => {
                let s = &mut model[u];
                let action = ACTIONS[action];
                let (target, ids, up_to) = if picks.is_empty() {
                    let up_to = (s.head() * percent / 100).max(1);
                    (
                        proto::update_state_request::Target::UpToSeq(up_to),
                        None,
                        up_to,
                    )
                } else {
                    let ids = s.pick(&picks);
                    let target = proto::update_state_request::Target::Ids(proto::NotificationIds {
                        ids: ids.clone(),
                    });
                    (target, Some(ids), 0)
                };
                let got = c
                    .update_state(authed(
                        proto::UpdateStateRequest {
                            action: action as i32,
                            target: Some(target),
                        },
                        &token(USERS[u], "", ""),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let want = s.change(action, ids.as_deref(), up_to).unwrap_or((0, 0));
                assert_eq!(
                    (got.changed, got.seq),
                    want,
                    "step {step}: {action:?} {ids:?} up to {up_to}"
                );
            }
            Op::Resume(u, percent) => {
                let s = &model[u];
                let after = s.head() * percent / 100;
                let got = resume(&mut c, USERS[u], after).await;
                let want: Vec<(u64, Ev)> = (after + 1..)
                    .zip(s.events[after as usize..].iter().cloned())
                    .collect();
                assert_eq!(got, want, "step {step}: {} resumes after {after}", USERS[u]);
            }
        }
    }
    // In the end, every stream in full, and the read state and counts.
    for (u, s) in model.iter().enumerate() {
        let want: Vec<(u64, Ev)> = (1..).zip(s.events.iter().cloned()).collect();
        assert_eq!(
            resume(&mut c, USERS[u], 0).await,
            want,
            "{}'s stream",
            USERS[u]
        );
        let inbox = s.notes.values().filter(|n| !n.deleted && !n.archived);
        let unread_now = inbox.clone().filter(|n| !n.read).count() as u64;
        let unseen_now = inbox.filter(|n| !n.seen).count() as u64;
        let counts = c
            .get_unread_count(authed(
                proto::GetUnreadCountRequest::default(),
                &token(USERS[u], "", ""),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (counts.unread, counts.unseen),
            (unread_now, unseen_now),
            "{}'s counts",
            USERS[u]
        );
        for archived in [false, true] {
            let listed = c
                .list_notifications(authed(
                    proto::ListNotificationsRequest {
                        page_size: 500,
                        archived,
                        ..Default::default()
                    },
                    &token(USERS[u], "", ""),
                ))
                .await
                .unwrap()
                .into_inner()
                .notifications;
            let got: Vec<(i64, u64, bool, bool)> = listed
                .iter()
                .map(|n| (n.id, n.seq, n.read, n.seen_at.is_some()))
                .collect();
            let mut want: Vec<(i64, u64, bool, bool)> = s
                .notes
                .iter()
                .filter(|(_, n)| !n.deleted && n.archived == archived)
                .map(|(id, n)| (*id, n.seq, n.read, n.seen))
                .collect();
            want.sort_unstable_by_key(|(_, seq, _, _)| std::cmp::Reverse(*seq));
            assert_eq!(got, want, "{}'s list (archived: {archived})", USERS[u]);
        }
    }
    d.stop().await;
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(12),
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn memory_store_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(bounded(run(Backend::Memory, ops)));
    }

    #[test]
    fn postgres_store_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(bounded(run(Backend::Postgres, ops)));
    }
}
