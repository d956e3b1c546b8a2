//! Inbox state changes (`UpdateState`, and `MarkRead`), black-box, on both
//! stores, the changing device and the watching device on different
//! replicas where the backend has them: each verb by ids, up to a seq and
//! by filter; the event each emits, live and on resume; what the listings,
//! the fresh backlog and the counters say after each; bad requests; and
//! counters that equal the listings after concurrent sends and changes.

mod common;

use std::collections::BTreeMap;

use common::*;
use herald::proto::{
    self, StateAction, event::Kind, notifications_client::NotificationsClient,
    update_state_request::Target,
};
use tonic::transport::Channel;

async fn update(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    action: StateAction,
    target: Target,
) -> Result<proto::UpdateStateResponse, tonic::Status> {
    client
        .update_state(authed(
            proto::UpdateStateRequest {
                action: action as i32,
                target: Some(target),
            },
            &token(user, "", ""),
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn ids(ids: &[i64]) -> Target {
    Target::Ids(proto::NotificationIds { ids: ids.to_vec() })
}

fn filter(types: &[&str], categories: &[&str], min: proto::Severity) -> proto::NotificationFilter {
    proto::NotificationFilter {
        types: types.iter().map(|t| (*t).to_owned()).collect(),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        min_severity: min as i32,
    }
}

/// A page of up to 500 of `user`'s notifications: the inbox, or the
/// archived ones.
async fn listing(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    archived: bool,
) -> Vec<proto::Notification> {
    client
        .list_notifications(authed(
            proto::ListNotificationsRequest {
                page_size: 500,
                archived,
                ..Default::default()
            },
            &token(user, "", ""),
        ))
        .await
        .expect("list")
        .into_inner()
        .notifications
}

async fn counts(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    filters: Vec<proto::UnreadFilter>,
) -> proto::GetUnreadCountResponse {
    client
        .get_unread_count(authed(
            proto::GetUnreadCountRequest { filters },
            &token(user, "", ""),
        ))
        .await
        .expect("count")
        .into_inner()
}

/// The inbox's titles, oldest first.
fn titles(list: &[proto::Notification]) -> Vec<String> {
    list.iter().rev().map(|n| n.title.clone()).collect()
}

/// (unread, unseen) as the inbox listing shows them.
fn listed_counts(inbox: &[proto::Notification]) -> (u64, u64) {
    let unread = inbox.iter().filter(|n| !n.read).count() as u64;
    let unseen = inbox.iter().filter(|n| n.seen_at.is_none()).count() as u64;
    (unread, unseen)
}

/// What one step of the scenario expects.
struct Expect {
    changed: u32,
    /// The event's kind as the watching device must see it.
    event: Option<Kind>,
    /// The inbox after, oldest first.
    inbox: &'static [&'static str],
    archived: &'static [&'static str],
    unread: u64,
    unseen: u64,
}

async fn every_verb_reaches_the_other_device_live_and_on_resume(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    // (title, type, category, severity)
    let sends = [
        ("n1", "build.passed", "ci", proto::Severity::Normal),
        ("n2", "build.failed", "ci", proto::Severity::High),
        ("n3", "comment.added", "social", proto::Severity::Low),
        ("n4", "comment.added", "social", proto::Severity::Normal),
        ("n5", "deploy.done", "ci", proto::Severity::Normal),
        ("n6", "billing.due", "billing", proto::Severity::Critical),
    ];
    let mut id = BTreeMap::new();
    for (title, kind, category, severity) in sends {
        let sent = send(
            &mut a,
            proto::SendNotificationRequest {
                r#type: kind.into(),
                category: category.into(),
                severity: severity as i32,
                ..note(&["alice"], title)
            },
        )
        .await
        .unwrap();
        id.insert(title, sent.deliveries[0].notification_id);
    }
    let mut other_device = subscribe(&mut b, "alice", Some(6)).await;
    until_caught_up(&mut other_device).await;

    let state = |action: StateAction, ids: &[i64], up_to_seq: u64, f| {
        Some(Kind::State(proto::StateChanged {
            action: action as i32,
            notification_ids: ids.to_vec(),
            up_to_seq,
            filter: f,
        }))
    };
    let read = |ids: &[i64], up_to_seq: u64| {
        Some(Kind::Read(proto::ReadStateChanged {
            notification_ids: ids.to_vec(),
            up_to_seq,
        }))
    };
    const ALL: &[&str] = &["n1", "n2", "n3", "n4", "n5", "n6"];
    let social = filter(&[], &["social"], proto::Severity::Unspecified);
    let builds = filter(&["build.*"], &[], proto::Severity::Unspecified);
    let critical = filter(&[], &[], proto::Severity::Critical);
    let steps: Vec<(StateAction, Target, Expect)> = vec![
        // The bell was opened on the first three: seen, still unread.
        (
            StateAction::Seen,
            Target::UpToSeq(3),
            Expect {
                changed: 3,
                event: state(StateAction::Seen, &[], 3, None),
                inbox: ALL,
                archived: &[],
                unread: 6,
                unseen: 3,
            },
        ),
        // A read change by ids is the v1 `read` event.
        (
            StateAction::Read,
            ids(&[id["n2"], id["n1"], id["n1"]]),
            Expect {
                changed: 2,
                event: read(&[id["n1"], id["n2"]], 0),
                inbox: ALL,
                archived: &[],
                unread: 4,
                unseen: 3,
            },
        ),
        (
            StateAction::Unread,
            ids(&[id["n1"], id["n3"]]), // n3 is unread already: unchanged
            Expect {
                changed: 1,
                event: state(StateAction::Unread, &[id["n1"]], 0, None),
                inbox: ALL,
                archived: &[],
                unread: 5,
                unseen: 3, // read-then-unread stays seen
            },
        ),
        // By filter: up to the head when it commits (seq 9).
        (
            StateAction::Archive,
            Target::Filter(social.clone()),
            Expect {
                changed: 2,
                event: state(StateAction::Archive, &[], 9, Some(social.clone())),
                inbox: &["n1", "n2", "n5", "n6"],
                archived: &["n3", "n4"],
                unread: 3,
                unseen: 2,
            },
        ),
        // A read change by filter is a `state` event.
        (
            StateAction::Read,
            Target::Filter(builds.clone()),
            Expect {
                changed: 1,
                event: state(StateAction::Read, &[], 10, Some(builds.clone())),
                inbox: &["n1", "n2", "n5", "n6"],
                archived: &["n3", "n4"],
                unread: 2,
                unseen: 2,
            },
        ),
        (
            StateAction::Delete,
            ids(&[id["n5"]]),
            Expect {
                changed: 1,
                event: state(StateAction::Delete, &[id["n5"]], 0, None),
                inbox: &["n1", "n2", "n6"],
                archived: &["n3", "n4"],
                unread: 1,
                unseen: 1,
            },
        ),
        // Deleted is deleted: nothing changes, nothing is emitted.
        (
            StateAction::Unarchive,
            ids(&[id["n5"], id["n6"]]),
            Expect {
                changed: 0,
                event: None,
                inbox: &["n1", "n2", "n6"],
                archived: &["n3", "n4"],
                unread: 1,
                unseen: 1,
            },
        ),
        // Up to a seq beyond the head: clamped to it (12).
        (
            StateAction::Unarchive,
            Target::UpToSeq(1_000),
            Expect {
                changed: 2,
                event: state(StateAction::Unarchive, &[], 12, None),
                inbox: &["n1", "n2", "n3", "n4", "n6"],
                archived: &[],
                unread: 3,
                unseen: 2,
            },
        ),
        (
            StateAction::Delete,
            Target::Filter(critical.clone()),
            Expect {
                changed: 1,
                event: state(StateAction::Delete, &[], 13, Some(critical.clone())),
                inbox: &["n1", "n2", "n3", "n4"],
                archived: &[],
                unread: 2,
                unseen: 1,
            },
        ),
    ];
    let mut head = 6;
    let mut live = Vec::new();
    for (i, (action, target, expect)) in steps.into_iter().enumerate() {
        let step = format!("step {i}: {action:?} {target:?}");
        let done = update(&mut a, "alice", action, target).await.unwrap();
        assert_eq!(done.changed, expect.changed, "{step}");
        if expect.event.is_some() {
            head += 1;
            assert_eq!(done.seq, head, "{step}");
            let event = next_event(&mut other_device).await;
            assert_eq!((event.seq, &event.kind), (head, &expect.event), "{step}");
            live.push(event);
        } else {
            assert_eq!(done.seq, 0, "{step}: nothing changed, no event");
        }
        let inbox = listing(&mut b, "alice", false).await;
        assert_eq!(titles(&inbox), expect.inbox, "{step}");
        let archived = listing(&mut b, "alice", true).await;
        assert_eq!(titles(&archived), expect.archived, "{step}");
        assert!(archived.iter().all(|n| n.archived_at.is_some()));
        assert!(inbox.iter().all(|n| n.archived_at.is_none()));
        assert!(inbox.iter().all(|n| n.read == n.read_at.is_some()));
        assert!(inbox.iter().filter(|n| n.read).all(|n| n.seen_at.is_some()));
        let c = counts(&mut b, "alice", vec![]).await;
        assert_eq!(
            (c.unread, c.unseen, c.seq),
            (expect.unread, expect.unseen, head),
            "{step}"
        );
        assert_eq!(
            listed_counts(&inbox),
            (c.unread, c.unseen),
            "{step}: counts = list"
        );
    }

    // The fresh backlog is the inbox's unread: n3 and n4 (archived, then
    // back), not the read n1 and n2 nor the deleted n5 and n6.
    let mut fresh = subscribe(&mut b, "alice", None).await;
    let (backlog, at) = until_caught_up(&mut fresh).await;
    let backlog: Vec<_> = backlog
        .iter()
        .map(|e| notification(e).title.clone())
        .collect();
    assert_eq!(
        (backlog, at),
        (vec!["n3".to_owned(), "n4".to_owned()], head)
    );

    // A device resuming from where the watcher started sees the same
    // changes, in the same order, at the same seqs.
    let mut resumed = subscribe(&mut b, "alice", Some(6)).await;
    let (replayed, at) = until_caught_up(&mut resumed).await;
    assert_eq!(at, head);
    assert_eq!(replayed, live);

    // Mark everything read through UpdateState: the v1 `read` event.
    let done = update(
        &mut a,
        "alice",
        StateAction::Read,
        Target::UpToSeq(u64::MAX),
    )
    .await
    .unwrap();
    assert_eq!((done.changed, done.seq), (2, head + 1));
    let event = next_event(&mut other_device).await;
    assert_eq!(event.kind, read(&[], head));
    let c = counts(&mut b, "alice", vec![]).await;
    assert_eq!((c.unread, c.unseen), (0, 0));
    d.stop().await;
}

async fn bad_state_requests_are_refused_naming_the_field_and_change_nothing(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let sent = send(&mut a, note(&["alice"], "one")).await.unwrap();
    let id = sent.deliveries[0].notification_id;
    let alice = token("alice", "", "");
    let cases: Vec<(&str, proto::UpdateStateRequest)> = vec![
        (
            "action",
            proto::UpdateStateRequest {
                action: 0,
                target: Some(ids(&[id])),
            },
        ),
        (
            "action",
            proto::UpdateStateRequest {
                action: 42,
                target: Some(ids(&[id])),
            },
        ),
        (
            "target",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: None,
            },
        ),
        (
            "ids",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(ids(&[])),
            },
        ),
        (
            "ids",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(ids(&[id, 0])),
            },
        ),
        (
            "ids",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(ids(&vec![id; 1_001])),
            },
        ),
        (
            "up_to_seq",
            proto::UpdateStateRequest {
                action: StateAction::Archive as i32,
                target: Some(Target::UpToSeq(0)),
            },
        ),
        (
            "filter",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(Target::Filter(proto::NotificationFilter::default())),
            },
        ),
        (
            "filter.types[1]",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(Target::Filter(filter(
                    &["test.event", "not a type"],
                    &[],
                    proto::Severity::Unspecified,
                ))),
            },
        ),
        (
            "filter.min_severity",
            proto::UpdateStateRequest {
                action: StateAction::Delete as i32,
                target: Some(Target::Filter(proto::NotificationFilter {
                    min_severity: 17,
                    ..Default::default()
                })),
            },
        ),
    ];
    for (field, request) in cases {
        assert_refused_naming(a.update_state(authed(request, &alice)).await, field);
    }
    let c = counts(&mut a, "alice", vec![]).await;
    assert_eq!((c.unread, c.unseen, c.seq), (1, 1, 1), "nothing changed");
    assert_eq!(titles(&listing(&mut a, "alice", false).await), ["one"]);
    // Another user's ids change nothing of theirs.
    let done = update(&mut a, "mallory", StateAction::Delete, ids(&[id]))
        .await
        .unwrap();
    assert_eq!((done.changed, done.seq), (0, 0));
    assert_eq!(titles(&listing(&mut a, "alice", false).await), ["one"]);
    d.stop().await;
}

/// Rounds of concurrent sends (in three categories) and state changes of
/// every kind, by ids, up-to and filter, from two replicas; after each
/// round the counters, total, unseen and named, equal what the listings
/// show. A counter that drifted once stays wrong, so checking at rest
/// catches any lost or doubled update under the concurrency.
async fn counts_equal_lists_after_concurrent_sends_and_changes(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let categories = ["ci", "social", "billing"];
    let named = || {
        categories
            .iter()
            .map(|c| proto::UnreadFilter {
                name: (*c).to_owned(),
                categories: vec![(*c).to_owned()],
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    for round in 0..3u64 {
        let mut tasks = Vec::new();
        for sender in 0..2usize {
            let mut c = d.client(d.replica(sender)).await;
            tasks.push(tokio::spawn(async move {
                for i in 0..30usize {
                    let category = categories[(i + sender) % categories.len()];
                    send(
                        &mut c,
                        proto::SendNotificationRequest {
                            category: category.into(),
                            r#type: format!("{category}.event"),
                            ..note(&["alice"], &format!("r{round} s{sender} {i}"))
                        },
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for changer in 0..2usize {
            let mut c = d.client(d.replica(changer + 1)).await;
            tasks.push(tokio::spawn(async move {
                let actions = [
                    StateAction::Read,
                    StateAction::Seen,
                    StateAction::Archive,
                    StateAction::Unread,
                    StateAction::Unarchive,
                    StateAction::Delete,
                ];
                for i in 0..24usize {
                    let action = actions[(i + changer * 3 + round as usize) % actions.len()];
                    let inbox = listing(&mut c, "alice", i % 4 == 0).await;
                    let target = match i % 3 {
                        0 if !inbox.is_empty() => {
                            let some: Vec<i64> =
                                inbox.iter().step_by(3).take(5).map(|n| n.id).collect();
                            ids(&some)
                        }
                        1 => Target::UpToSeq(inbox.first().map_or(1, |n| n.seq.max(1)) / 2 + 1),
                        _ => Target::Filter(filter(
                            &[],
                            &[categories[i % categories.len()]],
                            proto::Severity::Unspecified,
                        )),
                    };
                    update(&mut c, "alice", action, target).await.unwrap();
                }
            }));
        }
        // Meanwhile, on PostgreSQL: in every committed snapshot the
        // stream's counters equal its rows (what the listings read), so no
        // badge is ever off, not only at rest.
        let watch = tokio_util::sync::CancellationToken::new();
        let snapshots = match &d.db {
            Some(db) => {
                let db = db.connect().await;
                let watch = watch.clone();
                Some(tokio::spawn(async move {
                    let mut checked = 0u32;
                    while !watch.is_cancelled() {
                        db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                            .await
                            .unwrap();
                        let row = db
                            .query_one(
                                "SELECT (SELECT unread FROM user_streams WHERE user_id = 'alice'), \
                                   (SELECT unseen FROM user_streams WHERE user_id = 'alice'), \
                                   count(*) FILTER (WHERE read_at IS NULL), \
                                   count(*) FILTER (WHERE read_at IS NULL AND seen_at IS NULL) \
                                 FROM notifications WHERE user_id = 'alice' \
                                   AND archived_at IS NULL AND deleted_at IS NULL",
                                &[],
                            )
                            .await
                            .unwrap();
                        db.batch_execute("COMMIT").await.unwrap();
                        let counters: (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
                        let rows: (i64, i64) = (row.get(2), row.get(3));
                        assert_eq!(
                            (counters.0.unwrap_or(0), counters.1.unwrap_or(0)),
                            rows,
                            "round {round}: counters (unread, unseen) = rows in one snapshot"
                        );
                        checked += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                    checked
                }))
            }
            None => None,
        };
        for t in tasks {
            t.await.unwrap();
        }
        watch.cancel();
        if let Some(snapshots) = snapshots {
            let checked = snapshots.await.unwrap();
            assert!(
                checked >= 3,
                "round {round}: only {checked} snapshots checked"
            );
        }
        let mut c = d.client(0).await;
        let got = counts(&mut c, "alice", named()).await;
        let inbox = listing(&mut c, "alice", false).await;
        assert!(inbox.len() < 500, "the whole inbox fits one page");
        assert_eq!(
            (got.unread, got.unseen),
            listed_counts(&inbox),
            "round {round}: counters = list"
        );
        for (named, category) in got.counts.iter().zip(categories) {
            let listed = inbox
                .iter()
                .filter(|n| !n.read && n.category == category)
                .count() as u64;
            assert_eq!(named.unread, listed, "round {round}: {category}");
        }
        // Archived ones count nowhere; every notification is in exactly
        // one of the listings or deleted.
        let archived = listing(&mut c, "alice", true).await;
        assert!(archived.iter().all(|n| n.archived_at.is_some()));
        assert!(inbox.len() + archived.len() <= 60 * (round as usize + 1));
    }
    d.stop().await;
}

conformance!(
    every_verb_reaches_the_other_device_live_and_on_resume,
    bad_state_requests_are_refused_naming_the_field_and_change_nothing,
    counts_equal_lists_after_concurrent_sends_and_changes,
);

/// Retention deleting read, seen, archived, deleted and updated
/// notifications, and state and update events, takes from the counters
/// exactly what they counted of them: once everything is pruned, `unread`
/// and `unseen` are 0 on every stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_takes_from_the_counters_what_they_counted() {
    bounded(async {
        let d = Deployment::start_with(Backend::Postgres, 1, |c| {
            c.retention = std::time::Duration::from_secs(1);
            c.prune_interval = std::time::Duration::from_millis(100);
        })
        .await;
        let mut a = d.client(0).await;
        let mut sent = Vec::new();
        for i in 0..12 {
            let s = send(&mut a, note(&["alice", "bob"], &format!("n{i}")))
                .await
                .unwrap();
            sent.push(s.deliveries[0].notification_id);
        }
        // Updates in place, one of them making its notification unread
        // and unseen again.
        for (title, renotify) in [("v1", false), ("v2", false), ("v3", true)] {
            send(
                &mut a,
                proto::SendNotificationRequest {
                    replace_key: "progress".into(),
                    renotify,
                    ..note(&["alice"], title)
                },
            )
            .await
            .unwrap();
        }
        update(
            &mut a,
            "alice",
            StateAction::Read,
            Target::UpToSeq(u64::MAX),
        )
        .await
        .unwrap();
        send(
            &mut a,
            proto::SendNotificationRequest {
                replace_key: "progress".into(),
                renotify: true,
                ..note(&["alice"], "v4")
            },
        )
        .await
        .unwrap();
        let some = |from: usize| {
            sent.iter()
                .skip(from)
                .step_by(4)
                .copied()
                .collect::<Vec<_>>()
        };
        for (action, ids) in [
            (StateAction::Seen, some(0)),
            (StateAction::Read, some(1)),
            (StateAction::Archive, some(2)),
            (StateAction::Delete, some(3)),
            (StateAction::Archive, some(1)),
        ] {
            update(&mut a, "alice", action, self::ids(&ids))
                .await
                .unwrap();
        }
        let db = d.db.as_ref().unwrap().connect().await;
        until_all_pruned(&db).await;
        let rows = db
            .query(
                "SELECT user_id, unread, unseen FROM user_streams ORDER BY user_id",
                &[],
            )
            .await
            .unwrap();
        let counters: Vec<(String, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            counters,
            [("alice".to_owned(), 0, 0), ("bob".to_owned(), 0, 0)]
        );
        d.stop().await;
    })
    .await;
}
