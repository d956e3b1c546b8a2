//! Update in place (`replace_key`) and grouping (`group_key`), black-box,
//! on both stores, sender and watcher on different replicas where the
//! backend has them: the `updated` event live and on resume, the listing
//! and counters after it, `renotify`, folds racing onto one key (one
//! notification, every send applied, none lost), group windows, and bad
//! requests.

mod common;

use common::*;
use herald::proto::{
    self, StateAction, event::Kind, notifications_client::NotificationsClient,
    update_state_request::Target,
};
use tonic::transport::Channel;

fn replacing(key: &str, title: &str, renotify: bool) -> proto::SendNotificationRequest {
    proto::SendNotificationRequest {
        replace_key: key.into(),
        renotify,
        ..note(&["alice"], title)
    }
}

fn grouped(key: &str, actor: &str, title: &str) -> proto::SendNotificationRequest {
    proto::SendNotificationRequest {
        group_key: key.into(),
        group_window: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        actor: actor.into(),
        ..note(&["alice"], title)
    }
}

fn updated(event: &proto::Event) -> &proto::Notification {
    match &event.kind {
        Some(Kind::Updated(n)) => n,
        other => panic!("expected an updated event, got {other:?}"),
    }
}

async fn inbox(c: &mut NotificationsClient<Channel>) -> Vec<proto::Notification> {
    list(c, "alice", false, 500).await
}

async fn counts(c: &mut NotificationsClient<Channel>) -> (u64, u64) {
    let r = c
        .get_unread_count(authed(
            proto::GetUnreadCountRequest::default(),
            &token("alice", "", ""),
        ))
        .await
        .unwrap()
        .into_inner();
    (r.unread, r.unseen)
}

async fn replace_key_updates_in_place_live_and_on_resume(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    send(&mut a, note(&["alice"], "before")).await.unwrap();
    let placed = send(&mut a, replacing("order-7", "placed", false))
        .await
        .unwrap();
    let first = &placed.deliveries[0];
    assert_eq!((first.seq, first.updated), (2, false));
    let mut watcher = subscribe(&mut b, "alice", Some(2)).await;
    until_caught_up(&mut watcher).await;

    // The user reads it; an update without renotify keeps it read.
    mark_up_to(&mut a, "alice", 2).await;
    assert_eq!(next_event(&mut watcher).await.seq, 3);
    let shipped = send(&mut a, replacing("order-7", "shipped", false))
        .await
        .unwrap();
    let d2 = &shipped.deliveries[0];
    assert_eq!(
        (d2.notification_id, d2.seq, d2.updated),
        (first.notification_id, 4, true)
    );
    let event = next_event(&mut watcher).await;
    assert_eq!(event.seq, 4);
    let n = updated(&event);
    assert_eq!(
        (n.id, n.seq, n.title.as_str(), n.replace_key.as_str()),
        (first.notification_id, 2, "shipped", "order-7")
    );
    assert!(
        n.read && n.read_at.is_some(),
        "the state after the update: read"
    );
    let listed = inbox(&mut b).await;
    let titles: Vec<_> = listed.iter().map(|n| (n.title.as_str(), n.read)).collect();
    assert_eq!(titles, [("shipped", true), ("before", true)], "in place");
    assert_eq!(counts(&mut b).await, (0, 0));

    // With renotify it is news again: unread and unseen.
    send(&mut a, replacing("order-7", "delivered", true))
        .await
        .unwrap();
    let event = next_event(&mut watcher).await;
    let n = updated(&event);
    assert_eq!(n.title, "delivered");
    assert!(!n.read && n.seen_at.is_none(), "renotified: unread, unseen");
    let listed = inbox(&mut b).await;
    assert_eq!(
        (
            listed[0].title.as_str(),
            listed[0].read,
            listed[0].seen_at.is_none()
        ),
        ("delivered", false, true)
    );
    assert_eq!(counts(&mut b).await, (1, 1));

    // Another device resuming replays each event as it was.
    let mut resumed = subscribe(&mut b, "alice", Some(0)).await;
    let (events, head) = until_caught_up(&mut resumed).await;
    assert_eq!(head, 5);
    let shown: Vec<(u64, String)> = events
        .iter()
        .map(|e| match &e.kind {
            Some(Kind::Notification(n)) => (e.seq, format!("new {}", n.title)),
            Some(Kind::Updated(n)) => (e.seq, format!("updated {}@{}", n.title, n.seq)),
            Some(Kind::Read(_)) => (e.seq, "read".into()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        shown,
        [
            (1, "new before".to_owned()),
            (2, "new placed".to_owned()),
            (3, "read".to_owned()),
            (4, "updated shipped@2".to_owned()),
            (5, "updated delivered@2".to_owned()),
        ]
    );

    // Deleted, the key is free: the next send is a new notification.
    a.update_state(authed(
        proto::UpdateStateRequest {
            action: StateAction::Delete as i32,
            target: Some(Target::Ids(proto::NotificationIds {
                ids: vec![first.notification_id],
            })),
        },
        &token("alice", "", ""),
    ))
    .await
    .unwrap();
    let again = send(&mut a, replacing("order-7", "reordered", false))
        .await
        .unwrap();
    assert!(!again.deliveries[0].updated);
    assert_ne!(again.deliveries[0].notification_id, first.notification_id);
    let titles: Vec<_> = inbox(&mut b).await.into_iter().map(|n| n.title).collect();
    assert_eq!(titles, ["reordered", "before"]);
    d.stop().await;
}

/// Keys are per recipient: one send updates the recipients who have the
/// key and adds a notification for those who do not; and a retried keyed
/// send is answered from its first result.
async fn a_send_updates_some_recipients_and_adds_for_others(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    send(
        &mut a,
        proto::SendNotificationRequest {
            recipients: vec!["bob".into()],
            ..replacing("build-9", "queued", false)
        },
    )
    .await
    .unwrap();
    let request = proto::SendNotificationRequest {
        recipients: vec!["alice".into(), "bob".into()],
        idempotency_key: "k-running".into(),
        ..replacing("build-9", "running", false)
    };
    let sent = send(&mut a, request.clone()).await.unwrap();
    let how: Vec<_> = sent
        .deliveries
        .iter()
        .map(|d| (d.recipient.as_str(), d.updated))
        .collect();
    assert_eq!(how, [("alice", false), ("bob", true)]);
    let retried = send(&mut a, request).await.unwrap();
    assert_eq!(retried, sent, "the first result, replayed");
    for user in ["alice", "bob"] {
        let titles: Vec<_> = list(&mut a, user, false, 10)
            .await
            .into_iter()
            .map(|n| n.title)
            .collect();
        assert_eq!(titles, ["running"], "{user}");
    }
    // Folds onto one key in one bulk call (so, often, in one batch) apply
    // one after the other: five updates, each a new seq, in order.
    let bulk = a
        .send_notifications(authed(
            proto::SendNotificationsRequest {
                notifications: (0..5)
                    .map(|i| proto::SendNotificationRequest {
                        recipients: vec!["carol".into()],
                        ..replacing("step", &format!("step {i}"), false)
                    })
                    .collect(),
            },
            &sender_token(),
        ))
        .await
        .unwrap()
        .into_inner();
    let results: Vec<_> = bulk
        .results
        .iter()
        .map(|r| (r.code, r.deliveries[0].updated))
        .collect();
    assert_eq!(results.iter().filter(|(code, _)| *code == 0).count(), 5);
    assert_eq!(results.iter().filter(|(_, updated)| !updated).count(), 1);
    let carol = list(&mut a, "carol", false, 10).await;
    assert_eq!(carol.len(), 1);
    let mut stream = subscribe(&mut a, "carol", Some(0)).await;
    let (events, head) = until_caught_up(&mut stream).await;
    assert_eq!(head, 5);
    let last = updated(&events[4]);
    assert_eq!(
        last.title, carol[0].title,
        "the last applied is what is listed"
    );
    d.stop().await;
}

/// Sends racing onto one key from two replicas land on one notification,
/// one after the other: one is new, every other one an update, each
/// update's event in seq order, and (for a group) the count holds every
/// send.
async fn folds_racing_onto_one_key_lose_nothing(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    for group in [false, true] {
        let mut tasks = Vec::new();
        for replica in 0..2usize {
            let mut c = d.client(d.replica(replica)).await;
            tasks.push(tokio::spawn(async move {
                let mut updates = 0;
                for i in 0..10 {
                    let title = format!("r{replica} {i}");
                    let request = if group {
                        grouped("pr-1", &format!("user{replica}-{i}"), &title)
                    } else {
                        replacing("progress", &title, false)
                    };
                    let sent = send(&mut c, request).await.unwrap();
                    updates += usize::from(sent.deliveries[0].updated);
                }
                updates
            }));
        }
        let mut updates = 0;
        for t in tasks {
            updates += t.await.unwrap();
        }
        assert_eq!(updates, 19, "group {group}: one new, 19 updates");
        let mut c = d.client(0).await;
        let listed: Vec<_> = inbox(&mut c)
            .await
            .into_iter()
            .filter(|n| n.group_key.is_empty() != group)
            .collect();
        assert_eq!(listed.len(), 1, "group {group}: one notification");
        let mut stream = subscribe(&mut c, "alice", Some(0)).await;
        let (events, _) = until_caught_up(&mut stream).await;
        let mine: Vec<&proto::Event> = events
            .iter()
            .filter(|e| match &e.kind {
                Some(Kind::Notification(n) | Kind::Updated(n)) => n.id == listed[0].id,
                _ => false,
            })
            .collect();
        assert_eq!(mine.len(), 20, "group {group}: every send has its event");
        assert!(matches!(mine[0].kind, Some(Kind::Notification(_))));
        let last = updated(mine[19]);
        assert_eq!(last.title, listed[0].title, "the list shows the last one");
        if group {
            assert_eq!((listed[0].group_count, last.group_count), (20, 20));
            assert_eq!(listed[0].actors, last.actors);
            assert_eq!(listed[0].actors.len(), 5);
            // Newest first: the actors of the last five updates.
            let newest: Vec<String> = mine[15..]
                .iter()
                .rev()
                .map(|e| updated(e).actor.clone())
                .collect();
            assert_eq!(listed[0].actors, newest);
        }
    }
    d.stop().await;
}

async fn groups_fold_sends_with_their_count_and_actors(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let mut watcher = subscribe(&mut b, "alice", None).await;
    until_caught_up(&mut watcher).await;
    let opened = send(&mut a, grouped("comments:pr-1", "carol", "Carol commented"))
        .await
        .unwrap();
    let event = next_event(&mut watcher).await;
    let n = notification(&event);
    assert_eq!(
        (n.group_count, n.actors.as_slice()),
        (1, ["carol".to_owned()].as_slice())
    );
    for (actor, title) in [
        ("dave", "Dave commented"),
        ("carol", "Carol commented again"),
    ] {
        let sent = send(&mut a, grouped("comments:pr-1", actor, title))
            .await
            .unwrap();
        assert!(sent.deliveries[0].updated);
    }
    next_event(&mut watcher).await;
    let last = next_event(&mut watcher).await;
    let n = updated(&last);
    assert_eq!(n.id, opened.deliveries[0].notification_id);
    assert_eq!(
        (n.group_count, n.title.as_str()),
        (3, "Carol commented again")
    );
    assert_eq!(n.actors, ["carol", "dave"], "distinct, newest first");
    // Another key is another group; no group key, no group.
    send(&mut a, grouped("comments:pr-2", "erin", "Erin commented"))
        .await
        .unwrap();
    send(&mut a, note(&["alice"], "plain")).await.unwrap();
    let listed = inbox(&mut b).await;
    let groups: Vec<_> = listed
        .iter()
        .map(|n| (n.title.as_str(), n.group_key.as_str(), n.group_count))
        .collect();
    assert_eq!(
        groups,
        [
            ("plain", "", 0),
            ("Erin commented", "comments:pr-2", 1),
            ("Carol commented again", "comments:pr-1", 3),
        ]
    );
    d.stop().await;
}

async fn bad_fold_requests_are_refused_naming_the_field(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let window = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let cases = [
        (
            "renotify",
            proto::SendNotificationRequest {
                renotify: true,
                ..note(&["alice"], "x")
            },
        ),
        (
            "group_key",
            proto::SendNotificationRequest {
                replace_key: "a".into(),
                group_key: "b".into(),
                group_window: window(60),
                ..note(&["alice"], "x")
            },
        ),
        (
            "replace_key",
            proto::SendNotificationRequest {
                replace_key: "has space".into(),
                ..note(&["alice"], "x")
            },
        ),
        ("replace_key", replacing(&"k".repeat(129), "x", false)),
        (
            "group_window",
            proto::SendNotificationRequest {
                group_key: "g".into(),
                ..note(&["alice"], "x")
            },
        ),
        (
            "group_window",
            proto::SendNotificationRequest {
                group_key: "g".into(),
                group_window: window(8 * 24 * 3600),
                ..note(&["alice"], "x")
            },
        ),
        (
            "group_window",
            proto::SendNotificationRequest {
                group_window: window(60),
                ..note(&["alice"], "x")
            },
        ),
    ];
    for (field, request) in cases {
        refused_naming(&mut a, field, request).await;
    }
    assert!(inbox(&mut a).await.is_empty(), "nothing stored");
    d.stop().await;
}

/// A filtered stream gets the updates its filter matches, as it gets the
/// notifications.
async fn a_filtered_stream_gets_only_the_updates_its_filter_matches(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let mut deploys = b
        .subscribe(authed(
            proto::SubscribeRequest {
                types: vec!["deploy.*".into()],
                ..Default::default()
            },
            &token("alice", "", ""),
        ))
        .await
        .unwrap()
        .into_inner();
    until_caught_up(&mut deploys).await;
    for (kind, title) in [
        ("build.progress", "build 10 %"),
        ("deploy.progress", "deploy 10 %"),
        ("build.progress", "build 90 %"),
        ("deploy.progress", "deploy 90 %"),
    ] {
        let key = kind.split('.').next().unwrap_or_default();
        send(
            &mut a,
            proto::SendNotificationRequest {
                r#type: kind.into(),
                ..replacing(key, title, false)
            },
        )
        .await
        .unwrap();
    }
    let first = next_event(&mut deploys).await;
    assert_eq!(notification(&first).title, "deploy 10 %");
    let second = next_event(&mut deploys).await;
    assert_eq!(
        (second.seq, updated(&second).title.as_str()),
        (4, "deploy 90 %")
    );
    d.stop().await;
}

conformance!(
    a_filtered_stream_gets_only_the_updates_its_filter_matches,
    replace_key_updates_in_place_live_and_on_resume,
    a_send_updates_some_recipients_and_adds_for_others,
    folds_racing_onto_one_key_lose_nothing,
    groups_fold_sends_with_their_count_and_actors,
    bad_fold_requests_are_refused_naming_the_field,
);

/// A group closes when its window has passed since it opened: the next
/// send opens a new one. The test ages the group in the database rather
/// than waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_older_than_its_window_is_closed() {
    bounded(async {
        let d = Deployment::start(Backend::Postgres, 1).await;
        let mut a = d.client(0).await;
        let first = send(&mut a, grouped("digest", "a", "one")).await.unwrap();
        let folded = send(&mut a, grouped("digest", "b", "two")).await.unwrap();
        assert!(folded.deliveries[0].updated);
        let db = d.db.as_ref().unwrap().connect().await;
        db.execute(
            "UPDATE notifications SET created_at = created_at - interval '61 minutes'",
            &[],
        )
        .await
        .unwrap();
        let reopened = send(&mut a, grouped("digest", "c", "three")).await.unwrap();
        assert!(
            !reopened.deliveries[0].updated,
            "the window (1 h) has passed"
        );
        assert_ne!(
            reopened.deliveries[0].notification_id,
            first.deliveries[0].notification_id
        );
        let counts: Vec<u32> = inbox(&mut a).await.iter().map(|n| n.group_count).collect();
        assert_eq!(counts, [1, 2]);
        d.stop().await;
    })
    .await;
}
