//! The behavioural suite every store must pass, run once on the in-memory
//! store and once on PostgreSQL (a fresh database per test). Where the
//! backend supports it (Postgres), senders and subscribers are spread over
//! two replicas.

mod common;

use std::time::Duration;

use common::*;
use herald::proto::{self, event::Kind, mark_read_request::Target, resync::Reason as ResyncReason};
use tonic::Code;

fn resync_reason(event: &proto::Event) -> Option<ResyncReason> {
    match &event.kind {
        Some(Kind::Resync(r)) => Some(r.reason()),
        _ => None,
    }
}

/// `caught_up`, telling the test replicas' heartbeat interval (5 s, set
/// in `common::config`).
fn caught_up_kind() -> Option<Kind> {
    Some(Kind::CaughtUp(proto::CaughtUp {
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
    }))
}

async fn fresh_connect_replays_unread_then_caught_up_then_live(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    for i in 0..3 {
        send(&mut a, note(&["alice"], &format!("n{i}")))
            .await
            .unwrap();
    }
    // Read the first one so the fresh backlog is the unread two.
    let first = list(&mut a, "alice", false, 10).await;
    assert_eq!(first.len(), 3);
    let oldest = first.iter().min_by_key(|n| n.seq).unwrap();
    a.mark_read(authed(
        proto::MarkReadRequest {
            target: Some(Target::Ids(proto::NotificationIds {
                ids: vec![oldest.id],
            })),
        },
        &token("alice", "", ""),
    ))
    .await
    .unwrap();

    let mut stream = subscribe(&mut b, "alice", None).await;
    let (backlog, caught_up_at) = until_caught_up(&mut stream).await;
    let titles: Vec<_> = backlog
        .iter()
        .map(|e| notification(e).title.clone())
        .collect();
    assert_eq!(titles, ["n1", "n2"]);
    assert_eq!(caught_up_at, 4, "3 notifications + 1 read event");
    let n = notification(&backlog[0]);
    assert_eq!((n.r#type.as_str(), n.body.as_str()), ("test.event", "body"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&n.data).unwrap(),
        serde_json::json!({"k": 1})
    );

    send(&mut a, note(&["alice"], "live")).await.unwrap();
    let live = next_event(&mut stream).await;
    assert_eq!((live.seq, notification(&live).title.as_str()), (5, "live"));
    d.stop().await;
}

async fn resume_replays_missed_events_in_order(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    send(&mut a, note(&["alice"], "before")).await.unwrap();
    let mut stream = subscribe(&mut b, "alice", Some(0)).await;
    let (backlog, at) = until_caught_up(&mut stream).await;
    assert_eq!((backlog.len(), at), (1, 1));
    drop(stream);

    for i in 0..5 {
        send(&mut a, note(&["alice"], &format!("away{i}")))
            .await
            .unwrap();
    }
    let mut stream = subscribe(&mut b, "alice", Some(1)).await;
    let (missed, at) = until_caught_up(&mut stream).await;
    let seqs: Vec<_> = missed.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3, 4, 5, 6]);
    assert_eq!(at, 6);
    send(&mut a, note(&["alice"], "live")).await.unwrap();
    assert_eq!(next_event(&mut stream).await.seq, 7);

    // A position the server never issued (beyond the head) gets resync,
    // then the stream goes on live: never an error the client cannot get
    // past.
    let mut stream = subscribe(&mut b, "alice", Some(99)).await;
    let resync = next_event(&mut stream).await;
    assert_eq!(resync_reason(&resync), Some(ResyncReason::BeyondHead));
    assert_eq!(resync.seq, 7);
    assert_eq!(next_event(&mut stream).await.kind, caught_up_kind());
    send(&mut a, note(&["alice"], "after resync"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut stream).await.seq, 8);
    d.stop().await;
}

async fn pruned_resume_position_gets_resync(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| {
        c.retention = Duration::from_secs(1);
        c.prune_interval = Duration::from_millis(100);
    })
    .await;
    let mut a = d.client(0).await;
    send(&mut a, note(&["alice"], "old1")).await.unwrap();
    send(&mut a, note(&["alice"], "old2")).await.unwrap();
    // Wait for retention to delete both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while unread(&mut a, "alice").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = subscribe(&mut a, "alice", Some(1)).await;
    let event = next_event(&mut stream).await;
    assert_eq!(
        resync_reason(&event),
        Some(ResyncReason::Pruned),
        "{event:?}"
    );
    assert_eq!(event.seq, 2);
    let caught_up = next_event(&mut stream).await;
    assert!(matches!(caught_up.kind, Some(Kind::CaughtUp(_))));
    send(&mut a, note(&["alice"], "new")).await.unwrap();
    assert_eq!(next_event(&mut stream).await.seq, 3);
    d.stop().await;
}

/// Every event carries the stream's epoch; a position of another epoch gets
/// `resync` (then `caught_up`, then live), and a client that sends no epoch
/// keeps v1 behaviour. `caught_up` tells the heartbeat interval.
async fn positions_carry_an_epoch(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    for i in 0..3 {
        send(&mut a, note(&["alice"], &format!("n{i}")))
            .await
            .unwrap();
    }
    let mut stream = subscribe(&mut b, "alice", Some(0)).await;
    let mut backlog = Vec::new();
    let caught_up = loop {
        let event = next_event(&mut stream).await;
        if matches!(event.kind, Some(Kind::CaughtUp(_))) {
            break event;
        }
        backlog.push(event);
    };
    let epoch = caught_up.epoch;
    assert_ne!(epoch, 0);
    assert!(epoch < 1 << 53, "{epoch} must fit a JavaScript number");
    assert!(backlog.iter().all(|e| e.epoch == epoch), "{backlog:?}");
    assert_eq!(caught_up.kind, caught_up_kind());
    send(&mut a, note(&["alice"], "live")).await.unwrap();
    let live = next_event(&mut stream).await;
    assert_eq!((live.seq, live.epoch), (4, epoch));

    // The same position in its own epoch continues; in another, resyncs.
    let resume = |epoch| proto::SubscribeRequest {
        after_seq: Some(2),
        epoch,
        ..Default::default()
    };
    let mut same = b
        .subscribe(authed(resume(epoch), &token("alice", "", "")))
        .await
        .unwrap()
        .into_inner();
    let (missed, _) = until_caught_up(&mut same).await;
    assert_eq!(missed.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    let other = if epoch == 1 { 2 } else { epoch - 1 };
    let mut stale = b
        .subscribe(authed(resume(other), &token("alice", "", "")))
        .await
        .unwrap()
        .into_inner();
    let resync = next_event(&mut stale).await;
    assert_eq!(resync_reason(&resync), Some(ResyncReason::EpochChanged));
    assert_eq!((resync.seq, resync.epoch), (4, epoch));
    assert_eq!(next_event(&mut stale).await.kind, caught_up_kind());
    send(&mut a, note(&["alice"], "after")).await.unwrap();
    assert_eq!(next_event(&mut stale).await.seq, 5);
    d.stop().await;
}

/// User ids may hold `"` and `\`, which JSON escaping doubles: a send to
/// many such recipients must be stored and delivered (NOTIFY payloads are
/// sized on their encoded text), not fail with INTERNAL.
async fn recipients_whose_ids_need_escaping_are_delivered(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    let users: Vec<String> = (0..300)
        .map(|i| format!("{}{i}", "\"\\".repeat(60)))
        .collect();
    let watched = users[299].clone();
    let mut stream = subscribe(&mut b, &watched, Some(0)).await;
    until_caught_up(&mut stream).await;
    let recipients: Vec<&str> = users.iter().map(String::as_str).collect();
    let sent = send(&mut a, note(&recipients, "escaped")).await.unwrap();
    assert_eq!(sent.deliveries.len(), 300);
    let event = next_event(&mut stream).await;
    match event.kind {
        Some(Kind::Notification(n)) => {
            assert_eq!((n.recipient, n.title.as_str()), (watched, "escaped"))
        }
        other => panic!("expected the notification, got {other:?}"),
    }
    d.stop().await;
}

/// 8 senders × 250 sends to one user, racing; one subscriber connected
/// throughout, another disconnecting and resuming midway. Both must see seq
/// 1..=2000 exactly once, in order.
async fn racing_senders_exactly_once_in_order(backend: Backend) {
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 250;
    const TOTAL: u64 = (SENDERS * PER_SENDER) as u64;
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut steady_client = d.client(d.replica(1)).await;
    let mut steady = subscribe(&mut steady_client, "alice", Some(0)).await;
    until_caught_up(&mut steady).await;

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = d.client(d.replica(s % 2)).await;
        senders.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                send(&mut client, note(&["alice"], &format!("{s}-{i}")))
                    .await
                    .expect("send ok");
            }
        }));
    }

    // The flaky device: reads a while, drops, resumes from its last seq.
    let addrs: Vec<_> = d.replicas.iter().map(|r| r.addr).collect();
    let flaky = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut round = 0;
        while seen.last().copied().unwrap_or(0) < TOTAL {
            let mut c = client(addrs[round % addrs.len()]).await;
            let mut stream =
                subscribe(&mut c, "alice", Some(seen.last().copied().unwrap_or(0))).await;
            let budget = if round < 4 { 150 } else { usize::MAX };
            let mut taken = 0;
            while taken < budget {
                let event = next_event(&mut stream).await;
                if matches!(event.kind, Some(Kind::CaughtUp(_))) {
                    continue;
                }
                seen.push(event.seq);
                taken += 1;
                if event.seq == TOTAL {
                    break;
                }
            }
            round += 1;
        }
        (seen, round)
    });

    for s in senders {
        s.await.unwrap();
    }
    let steady_seen = seqs_through(&mut steady, TOTAL).await;
    assert_exactly_once_in_order(&steady_seen, TOTAL, "steady subscriber");
    let (flaky_seen, rounds) = flaky.await.unwrap();
    assert!(
        rounds > 4,
        "the flaky subscriber reconnected {rounds} times"
    );
    assert_exactly_once_in_order(&flaky_seen, TOTAL, "resuming subscriber");
    assert_eq!(unread(&mut steady_client, "alice").await, TOTAL);
    d.stop().await;
}

async fn mark_read_reaches_other_devices(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    let sent = send(&mut a, note(&["alice"], "one")).await.unwrap();
    send(&mut a, note(&["alice"], "two")).await.unwrap();
    send(&mut a, note(&["alice"], "three")).await.unwrap();
    let mut other_device = subscribe(&mut b, "alice", Some(3)).await;
    until_caught_up(&mut other_device).await;

    let alice = token("alice", "", "");
    let id = sent.deliveries[0].notification_id;
    let marked = a
        .mark_read(authed(
            proto::MarkReadRequest {
                target: Some(Target::Ids(proto::NotificationIds { ids: vec![id, id] })),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((marked.marked, marked.seq), (1, 4));
    let event = next_event(&mut other_device).await;
    match event.kind {
        Some(Kind::Read(r)) => assert_eq!(r.notification_ids, [id]),
        other => panic!("expected a read event, got {other:?}"),
    }
    assert_eq!(unread(&mut b, "alice").await, 2);

    // Marking it again changes nothing and emits nothing.
    let again = a
        .mark_read(authed(
            proto::MarkReadRequest {
                target: Some(Target::Ids(proto::NotificationIds { ids: vec![id] })),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.marked, again.seq), (0, 0));

    // Mark all read: up_to_seq beyond the head is clamped to it.
    let all = a
        .mark_read(authed(
            proto::MarkReadRequest {
                target: Some(Target::UpToSeq(1_000)),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.marked, all.seq), (2, 5));
    let event = next_event(&mut other_device).await;
    assert_eq!(event.seq, 5);
    match event.kind {
        Some(Kind::Read(r)) => assert_eq!(r.up_to_seq, 4),
        other => panic!("expected a read event, got {other:?}"),
    }
    assert_eq!(unread(&mut b, "alice").await, 0);
    let list = b
        .list_notifications(authed(
            proto::ListNotificationsRequest {
                unread_only: false,
                page_size: 0,
                page_token: String::new(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(list.notifications.iter().all(|n| n.read));
    assert_eq!(list.notifications.len(), 3);
    d.stop().await;
}

async fn list_pages_newest_first_and_agrees_with_count(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    for i in 0..7 {
        send(&mut a, note(&["alice"], &format!("n{i}")))
            .await
            .unwrap();
    }
    mark_up_to(&mut a, "alice", 2).await;
    let alice = token("alice", "", "");
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = a
            .list_notifications(authed(
                proto::ListNotificationsRequest {
                    unread_only: true,
                    page_size: 2,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                &alice,
            ))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.notifications.iter().map(|n| n.title.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(all, ["n6", "n5", "n4", "n3", "n2"]);
    assert_eq!(unread(&mut a, "alice").await, all.len() as u64);
    let bad = a
        .list_notifications(authed(
            proto::ListNotificationsRequest {
                unread_only: false,
                page_size: 501,
                page_token: String::new(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_size"));
    d.stop().await;
}

async fn idempotent_send_stores_and_delivers_once(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    let mut stream = subscribe(&mut b, "alice", Some(0)).await;
    until_caught_up(&mut stream).await;

    let mut request = note(&["alice", "bob"], "once");
    request.idempotency_key = "order-42-shipped".into();
    // Concurrent retries through both replicas, then a late one.
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
        let r = request.clone();
        calls.push(tokio::spawn(async move { send(&mut c, r).await }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap().expect("send ok").deliveries);
    }
    answers.push(send(&mut a, request.clone()).await.unwrap().deliveries);
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(answers[0].len(), 2);

    // The same key for a different request is refused.
    let mut other = request.clone();
    other.title = "different".into();
    let err = send(&mut a, other).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // One event reached the stream; the next send is seq 2.
    send(&mut a, note(&["alice"], "after")).await.unwrap();
    let seqs = seqs_through(&mut stream, 2).await;
    assert_eq!(seqs, [1, 2]);
    assert_eq!(unread(&mut a, "alice").await, 2);
    assert_eq!(unread(&mut a, "bob").await, 1);
    d.stop().await;
}

async fn bad_input_is_refused_naming_the_field_and_stores_nothing(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let cases: Vec<(&str, proto::SendNotificationRequest)> = vec![
        (
            "recipients",
            proto::SendNotificationRequest {
                recipients: vec![],
                ..note(&[], "t")
            },
        ),
        ("recipients[1]", note(&["alice", ""], "t")),
        (
            "type",
            proto::SendNotificationRequest {
                r#type: String::new(),
                ..note(&["alice"], "t")
            },
        ),
        (
            "type",
            proto::SendNotificationRequest {
                r#type: "t".repeat(129),
                ..note(&["alice"], "t")
            },
        ),
        ("title", note(&["alice"], "")),
        (
            "data",
            proto::SendNotificationRequest {
                data: "[1,2]".into(),
                ..note(&["alice"], "t")
            },
        ),
        (
            "data",
            proto::SendNotificationRequest {
                data: "{nope".into(),
                ..note(&["alice"], "t")
            },
        ),
        (
            "body",
            proto::SendNotificationRequest {
                body: "b".repeat(16 * 1024 + 1),
                ..note(&["alice"], "t")
            },
        ),
    ];
    for (field, request) in cases {
        refused_naming(&mut a, field, request).await;
    }
    assert_eq!(unread(&mut a, "alice").await, 0);

    let alice = token("alice", "", "");
    let err = a
        .mark_read(authed(proto::MarkReadRequest { target: None }, &alice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a
        .subscribe(authed(
            proto::SubscribeRequest {
                after_seq: None,
                types: vec!["bad type".into()],
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("types[0]"));
    d.stop().await;
}

async fn type_filter_and_heartbeats(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| {
        c.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let mut a = d.client(0).await;
    let mut stream = a
        .subscribe(authed(
            proto::SubscribeRequest {
                after_seq: Some(0),
                types: vec!["wanted".into()],
                ..Default::default()
            },
            &token("alice", "", ""),
        ))
        .await
        .unwrap()
        .into_inner();
    until_caught_up(&mut stream).await;
    send(&mut a, note(&["alice"], "skipped")).await.unwrap();
    let mut wanted = note(&["alice"], "kept");
    wanted.r#type = "wanted".into();
    send(&mut a, wanted).await.unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(
        (event.seq, notification(&event).title.as_str()),
        (2, "kept")
    );
    // Idle: a heartbeat carries the position reached.
    let beat = tokio::time::timeout(EVENT_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(beat.kind, Some(Kind::Heartbeat(_))), "{beat:?}");
    assert_eq!(beat.seq, 2);
    d.stop().await;
}

/// A subscriber that does not read while many events are sent still gets
/// all of them, in order, once it reads: its queue overflows to the store.
async fn slow_subscriber_catches_up_from_the_store(backend: Backend) {
    let d = Deployment::start_with(backend, 1, |c| c.streams.queue_len = 4).await;
    let mut a = d.client(0).await;
    let mut stream = subscribe(&mut a, "alice", Some(0)).await;
    until_caught_up(&mut stream).await;
    const N: u64 = 600;
    for i in 0..N {
        send(&mut a, note(&["alice"], &format!("n{i}")))
            .await
            .unwrap();
    }
    let seqs = seqs_through(&mut stream, N).await;
    assert_exactly_once_in_order(&seqs, N, "slow subscriber");
    d.stop().await;
}

async fn bulk_send_answers_each_item_and_a_bad_one_fails_alone(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let mut a = d.client(0).await;
    let mut b = d.client(d.replica(1)).await;
    let mut alice = subscribe(&mut b, "alice", Some(0)).await;
    until_caught_up(&mut alice).await;

    let mut keyed = note(&["bob"], "keyed");
    keyed.idempotency_key = "batch-7".into();
    send(&mut a, keyed.clone()).await.unwrap();
    let mut bad_type = note(&["alice"], "bad type");
    bad_type.r#type = "has space".into();
    let mut misused_key = note(&["bob"], "other request");
    misused_key.idempotency_key = "batch-7".into();
    let items = vec![
        note(&["alice", "bob"], "one"),
        bad_type,
        note(&["alice"], "two"),
        keyed,       // a replay: the earlier deliveries, nothing stored
        misused_key, // the key of another request
        note(&[], "no recipients"),
        note(&["carol"], "three"),
    ];
    let results = a
        .send_notifications(authed(
            proto::SendNotificationsRequest {
                notifications: items,
            },
            &sender_token(),
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<(u32, Code)> = results
        .iter()
        .map(|r| (r.index, Code::from_i32(r.code)))
        .collect();
    assert_eq!(
        codes,
        [
            (0, Code::Ok),
            (1, Code::InvalidArgument),
            (2, Code::Ok),
            (3, Code::Ok),
            (4, Code::FailedPrecondition),
            (5, Code::InvalidArgument),
            (6, Code::Ok),
        ]
    );
    assert!(
        results[1].message.starts_with("notifications[1].type:"),
        "{:?}",
        results[1].message
    );
    assert!(
        results[5]
            .message
            .starts_with("notifications[5].recipients"),
        "{:?}",
        results[5].message
    );
    assert_eq!(results[0].deliveries.len(), 2);
    assert!(results[1].deliveries.is_empty());
    // The replay answers with the first send's delivery: bob's seq 1.
    assert_eq!(results[3].deliveries.len(), 1);
    assert_eq!(results[3].deliveries[0].seq, 1);

    // alice got both of her items, live on the other replica, and nothing
    // of the failed ones was stored.
    let mut titles = Vec::new();
    for _ in 0..2 {
        titles.push(notification(&next_event(&mut alice).await).title.clone());
    }
    titles.sort();
    assert_eq!(titles, ["one", "two"]);
    assert_eq!(unread(&mut a, "alice").await, 2);
    assert_eq!(unread(&mut a, "bob").await, 2);
    assert_eq!(unread(&mut a, "carol").await, 1);

    // No items, or more than the limit (1,000): the call is refused.
    for n in [0, 1_001] {
        let err = a
            .send_notifications(authed(
                proto::SendNotificationsRequest {
                    notifications: vec![note(&["alice"], "x"); n],
                },
                &sender_token(),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("notifications:"), "{err:?}");
    }
    // Without the send scope: refused as a whole.
    let err = a
        .send_notifications(authed(
            proto::SendNotificationsRequest {
                notifications: vec![note(&["alice"], "x")],
            },
            &token("alice", "", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(unread(&mut a, "alice").await, 2);
    d.stop().await;
}

/// A send with every presentation field filled, to two recipients.
fn rich_note(recipients: &[&str], title: &str) -> proto::SendNotificationRequest {
    proto::SendNotificationRequest {
        category: "builds".into(),
        severity: proto::Severity::Critical as i32,
        actor: "ci-runner".into(),
        action_url: "https://ci.example.com/builds/42".into(),
        actions: vec![
            proto::Action {
                label: "Open".into(),
                url: "/builds/42".into(),
            },
            proto::Action {
                label: "Retry \"now\" ✓".into(),
                url: "https://ci.example.com/builds/42/retry?x=1&y=2".into(),
            },
        ],
        ..note(recipients, title)
    }
}

/// The presentation fields of a notification, to compare.
fn presentation(n: &proto::Notification) -> (String, i32, String, String, Vec<proto::Action>) {
    (
        n.category.clone(),
        n.severity,
        n.actor.clone(),
        n.action_url.clone(),
        n.actions.clone(),
    )
}

async fn presentation_fields_are_stored_and_returned_everywhere(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let mut live = subscribe(&mut b, "alice", None).await;
    until_caught_up(&mut live).await;
    let sent = rich_note(&["alice", "bob"], "rich");
    let want = (
        "builds".to_owned(),
        proto::Severity::Critical as i32,
        "ci-runner".to_owned(),
        sent.action_url.clone(),
        sent.actions.clone(),
    );
    send(&mut a, sent).await.unwrap();
    // Without an actor, the sending token's user; without a severity, normal.
    send(&mut a, note(&["alice"], "plain")).await.unwrap();

    // Live, on the other replica (through the bus payload).
    let event = next_event(&mut live).await;
    assert_eq!(presentation(notification(&event)), want);
    let plain = next_event(&mut live).await;
    let plain = notification(&plain);
    assert_eq!(plain.actor, "billing-service", "the sender's sub");
    assert_eq!(plain.severity, proto::Severity::Normal as i32);
    assert!(plain.category.is_empty() && plain.actions.is_empty());
    assert!(plain.read_at.is_none());

    // In a backlog read from the store.
    let mut again = subscribe(&mut a, "bob", Some(0)).await;
    let (backlog, _) = until_caught_up(&mut again).await;
    assert_eq!(presentation(notification(&backlog[0])), want);

    // Listed, with read_at once read.
    let listed = list(&mut a, "alice", false, 10).await;
    assert_eq!(presentation(&listed[1]), want);
    assert!(listed.iter().all(|n| !n.read && n.read_at.is_none()));
    mark_up_to(&mut a, "alice", 1).await;
    let listed = list(&mut a, "alice", false, 10).await;
    let read_at = listed[1].read_at.expect("read_at once read");
    let now = std::time::SystemTime::now();
    let read_at = std::time::SystemTime::try_from(read_at).unwrap();
    assert!(read_at <= now && now.duration_since(read_at).unwrap() < Duration::from_secs(60));
    assert!(listed[1].read && listed[0].read_at.is_none());

    // An idempotent replay must match presentation fields too.
    let keyed = proto::SendNotificationRequest {
        idempotency_key: "k".into(),
        ..rich_note(&["carol"], "keyed")
    };
    send(&mut a, keyed.clone()).await.unwrap();
    let err = send(
        &mut a,
        proto::SendNotificationRequest {
            severity: proto::Severity::Low as i32,
            ..keyed
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    d.stop().await;
}

async fn bad_presentation_fields_are_refused_naming_the_field(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    fn action(label: &str, url: &str) -> proto::Action {
        proto::Action {
            label: label.into(),
            url: url.into(),
        }
    }
    type Mutation = fn(&mut proto::SendNotificationRequest);
    let cases: Vec<(&str, Mutation)> = vec![
        ("severity", |r| r.severity = 9),
        ("category", |r| r.category = "no spaces".into()),
        ("category", |r| r.category = "c".repeat(65)),
        ("actor", |r| r.actor = "a".repeat(129)),
        ("action_url", |r| {
            r.action_url = "javascript:alert(1)".into()
        }),
        ("action_url", |r| r.action_url = "//evil.example/x".into()),
        ("action_url", |r| r.action_url = "https://e.com/a b".into()),
        ("action_url", |r| {
            r.action_url = format!("/{}", "x".repeat(2048))
        }),
        ("actions", |r| r.actions = vec![action("a", "/a"); 6]),
        ("actions[1].label", |r| {
            r.actions = vec![action("a", "/a"), action("", "/b")]
        }),
        ("actions[0].label", |r| {
            r.actions = vec![action(&"l".repeat(65), "/a")]
        }),
        ("actions[0].url", |r| {
            r.actions = vec![action("a", "ftp://x.example/")]
        }),
        ("actions[0].url", |r| r.actions = vec![action("a", "")]),
    ];
    for (field, mutate) in cases {
        let mut request = rich_note(&["alice"], "t");
        mutate(&mut request);
        refused_naming(&mut a, field, request).await;
    }
    assert_eq!(unread(&mut a, "alice").await, 0, "nothing stored");
    d.stop().await;
}

async fn filters_select_the_same_notifications_in_streams_lists_and_counts(backend: Backend) {
    let d = Deployment::start(backend, replicas(backend)).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let alice = token("alice", "", "");
    let filter = |types: &[&str], categories: &[&str], min: proto::Severity| {
        (
            types
                .iter()
                .map(|t| (*t).to_owned())
                .collect::<Vec<String>>(),
            categories
                .iter()
                .map(|c| (*c).to_owned())
                .collect::<Vec<String>>(),
            min as i32,
        )
    };
    // A filtered stream, opened before the sends.
    let (types, categories, min_severity) = filter(
        &["project.*", "billing_due"],
        &[],
        proto::Severity::Unspecified,
    );
    let mut stream = b
        .subscribe(authed(
            proto::SubscribeRequest {
                types,
                categories,
                min_severity,
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    until_caught_up(&mut stream).await;
    // (type, category, severity, title)
    let sends = [
        ("project.created", "work", proto::Severity::Low, "p1"),
        ("project.a.b", "work", proto::Severity::Critical, "p2"),
        (
            "project",
            "work",
            proto::Severity::High,
            "not a prefix match",
        ),
        ("projects.x", "", proto::Severity::High, "neither"),
        ("billing_due", "billing", proto::Severity::High, "bill"),
        (
            "billingXdue",
            "billing",
            proto::Severity::Normal,
            "underscore is no wildcard",
        ),
    ];
    for (kind, category, severity, title) in sends {
        send(
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
    }
    let mut streamed = Vec::new();
    while streamed.len() < 3 {
        streamed.push(notification(&next_event(&mut stream).await).title.clone());
    }
    assert_eq!(streamed, ["p1", "p2", "bill"]);

    // Lists and counts with the same filters agree.
    let cases = [
        (
            filter(
                &["project.*", "billing_due"],
                &[],
                proto::Severity::Unspecified,
            ),
            vec!["bill", "p2", "p1"],
        ),
        (
            filter(&[], &["billing"], proto::Severity::Unspecified),
            vec!["underscore is no wildcard", "bill"],
        ),
        (
            filter(&[], &[], proto::Severity::High),
            vec!["bill", "neither", "not a prefix match", "p2"],
        ),
        (
            filter(&["project.*"], &["work"], proto::Severity::High),
            vec!["p2"],
        ),
        (
            filter(&["nothing.*"], &[], proto::Severity::Unspecified),
            vec![],
        ),
    ];
    let mut named = Vec::new();
    for (i, ((types, categories, min_severity), want)) in cases.iter().enumerate() {
        let listed = a
            .list_notifications(authed(
                proto::ListNotificationsRequest {
                    unread_only: true,
                    page_size: 50,
                    types: types.clone(),
                    categories: categories.clone(),
                    min_severity: *min_severity,
                    ..Default::default()
                },
                &alice,
            ))
            .await
            .unwrap()
            .into_inner()
            .notifications;
        let titles: Vec<&str> = listed.iter().map(|n| n.title.as_str()).collect();
        assert_eq!(titles, *want, "case {i}");
        named.push(proto::UnreadFilter {
            name: format!("f{i}"),
            types: types.clone(),
            categories: categories.clone(),
            min_severity: *min_severity,
        });
    }
    let counter = a.clone();
    let counted = |named: Vec<proto::UnreadFilter>| {
        let mut a = counter.clone();
        let alice = alice.clone();
        async move {
            a.get_unread_count(authed(
                proto::GetUnreadCountRequest { filters: named },
                &alice,
            ))
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let counts = counted(named.clone()).await.unwrap();
    assert_eq!(counts.unread, 6);
    let got: Vec<(String, u64)> = counts
        .counts
        .into_iter()
        .map(|c| (c.name, c.unread))
        .collect();
    let want: Vec<(String, u64)> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, w))| (format!("f{i}"), w.len() as u64))
        .collect();
    assert_eq!(got, want);
    // Read ones leave the counts.
    mark_up_to(&mut a, "alice", 2).await;
    let counts = counted(named.clone()).await.unwrap();
    assert_eq!(counts.counts[0].unread, 1, "only bill is still unread");

    // Bad filters name the field.
    for (request, field) in [
        (
            proto::UnreadFilter {
                name: String::new(),
                ..named[0].clone()
            },
            "filters[0].name",
        ),
        (
            proto::UnreadFilter {
                types: vec!["a b.*".into()],
                ..named[0].clone()
            },
            "filters[0].types[0]",
        ),
        (
            proto::UnreadFilter {
                types: vec![".*".into()],
                ..named[0].clone()
            },
            "filters[0].types[0]",
        ),
        (
            proto::UnreadFilter {
                categories: vec!["x y".into()],
                ..named[0].clone()
            },
            "filters[0].categories[0]",
        ),
        (
            proto::UnreadFilter {
                min_severity: 7,
                ..named[0].clone()
            },
            "filters[0].min_severity",
        ),
    ] {
        let err = counted(vec![request]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = counted(vec![named[0].clone(), named[0].clone()])
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("filters[1].name"),
        "{}",
        err.message()
    );
    let err = counted(
        (0..21)
            .map(|i| proto::UnreadFilter {
                name: format!("n{i}"),
                ..Default::default()
            })
            .collect(),
    )
    .await
    .unwrap_err();
    assert!(err.message().starts_with("filters:"), "{}", err.message());
    d.stop().await;
}

async fn server_stop_ends_streams_with_unavailable(backend: Backend) {
    let d = Deployment::start(backend, 1).await;
    let mut a = d.client(0).await;
    let mut stream = subscribe(&mut a, "alice", None).await;
    until_caught_up(&mut stream).await;
    d.stop().await;
    let status = final_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

conformance!(
    fresh_connect_replays_unread_then_caught_up_then_live,
    resume_replays_missed_events_in_order,
    pruned_resume_position_gets_resync,
    positions_carry_an_epoch,
    recipients_whose_ids_need_escaping_are_delivered,
    racing_senders_exactly_once_in_order,
    mark_read_reaches_other_devices,
    list_pages_newest_first_and_agrees_with_count,
    idempotent_send_stores_and_delivers_once,
    bad_input_is_refused_naming_the_field_and_stores_nothing,
    type_filter_and_heartbeats,
    slow_subscriber_catches_up_from_the_store,
    server_stop_ends_streams_with_unavailable,
    bulk_send_answers_each_item_and_a_bad_one_fails_alone,
    presentation_fields_are_stored_and_returned_everywhere,
    bad_presentation_fields_are_refused_naming_the_field,
    filters_select_the_same_notifications_in_streams_lists_and_counts,
);
