//! Expiry (`expires_at`) and scheduling (`deliver_at`), black-box, on both
//! stores, with a clock the test moves forward (no test sleeps for the
//! times it checks): expired notifications leave listings, counts and the
//! fresh backlog at once and are then deleted with a `state` event;
//! scheduled sends take no seq until due, are delivered once when the
//! clock passes their time, can be cancelled by idempotency key, and
//! answer retries consistently; bad times are refused naming the field.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use herald::{
    clock::Clock,
    proto::{self, StateAction, event::Kind, notifications_client::NotificationsClient},
};
use tonic::transport::Channel;

/// A deployment whose replicas go by `clock`, running the scheduler often.
async fn start(backend: Backend, clock: &Clock) -> Deployment {
    let clock = clock.clone();
    Deployment::start_with(backend, replicas(backend), move |c| {
        c.clock = clock.clone();
        c.schedule_interval = Duration::from_millis(20);
    })
    .await
}

fn at(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
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

async fn titles(c: &mut NotificationsClient<Channel>) -> Vec<String> {
    list(c, "alice", false, 100)
        .await
        .into_iter()
        .map(|n| n.title)
        .collect()
}

async fn cancel(c: &mut NotificationsClient<Channel>, key: &str) -> Result<bool, tonic::Status> {
    c.cancel_scheduled_notification(authed(
        proto::CancelScheduledNotificationRequest {
            idempotency_key: key.into(),
        },
        &sender_token(),
    ))
    .await
    .map(|r| r.into_inner().cancelled)
}

async fn expired_notifications_leave_at_once_then_are_deleted(backend: Backend) {
    let clock = Clock::manual();
    let d = start(backend, &clock).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let code = send(
        &mut a,
        proto::SendNotificationRequest {
            expires_at: at(clock.now() + Duration::from_secs(600)),
            ..note(&["alice"], "code 123456")
        },
    )
    .await
    .unwrap();
    let code_id = code.deliveries[0].notification_id;
    send(&mut a, note(&["alice"], "plain")).await.unwrap();
    let mut watcher = subscribe(&mut b, "alice", Some(2)).await;
    until_caught_up(&mut watcher).await;
    let listed = list(&mut b, "alice", false, 10).await;
    assert!(
        listed[1].expires_at.is_some(),
        "returned with the notification"
    );
    assert_eq!(titles(&mut b).await, ["plain", "code 123456"]);
    assert_eq!(counts(&mut b).await, (2, 2));

    clock.advance(Duration::from_secs(601));
    // Gone from listings and counts at once, whether or not the scheduler
    // has deleted it yet.
    assert_eq!(titles(&mut b).await, ["plain"]);
    assert_eq!(counts(&mut b).await, (1, 1));
    let mut fresh = subscribe(&mut b, "alice", None).await;
    let (backlog, _) = until_caught_up(&mut fresh).await;
    let backlog: Vec<_> = backlog
        .iter()
        .map(|e| notification(e).title.clone())
        .collect();
    assert_eq!(backlog, ["plain"]);
    // Then the scheduler deletes it: every device hears.
    let event = next_event(&mut watcher).await;
    assert_eq!(event.seq, 3);
    match event.kind {
        Some(Kind::State(s)) => {
            assert_eq!(s.action, StateAction::Delete as i32);
            assert_eq!(s.notification_ids, [code_id]);
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    assert_eq!(counts(&mut b).await, (1, 1));

    // An update in place moves the expiry with its content.
    for minutes in [10, 60] {
        send(
            &mut a,
            proto::SendNotificationRequest {
                replace_key: "offer".into(),
                expires_at: at(clock.now() + Duration::from_secs(60 * minutes)),
                ..note(&["alice"], &format!("offer for {minutes} min"))
            },
        )
        .await
        .unwrap();
    }
    clock.advance(Duration::from_secs(20 * 60));
    tokio::time::sleep(Duration::from_millis(100)).await; // a few scheduler runs
    assert_eq!(titles(&mut b).await, ["offer for 60 min", "plain"]);
    clock.advance(Duration::from_secs(41 * 60));
    assert_eq!(titles(&mut b).await, ["plain"]);
    d.stop().await;
}

async fn scheduled_sends_are_delivered_when_due_and_cancellable(backend: Backend) {
    let clock = Clock::manual();
    let d = start(backend, &clock).await;
    let (mut a, mut b) = (d.client(0).await, d.client(d.replica(1)).await);
    let mut watcher = subscribe(&mut b, "alice", None).await;
    until_caught_up(&mut watcher).await;
    let in_an_hour = proto::SendNotificationRequest {
        deliver_at: at(clock.now() + Duration::from_secs(3600)),
        idempotency_key: "reminder-1".into(),
        ..note(&["alice", "bob"], "stand-up in 5 min")
    };
    let scheduled = send(&mut a, in_an_hour.clone()).await.unwrap();
    assert!(scheduled.scheduled && scheduled.deliveries.is_empty());
    let later = proto::SendNotificationRequest {
        deliver_at: at(clock.now() + Duration::from_secs(7200)),
        idempotency_key: "reminder-2".into(),
        ..note(&["alice"], "cancelled one")
    };
    assert!(send(&mut a, later).await.unwrap().scheduled);
    assert!(cancel(&mut a, "reminder-2").await.unwrap());
    assert!(!cancel(&mut a, "reminder-2").await.unwrap(), "only once");
    assert!(!cancel(&mut a, "never-scheduled").await.unwrap());
    // A retry answers the same: scheduled, nothing delivered.
    let retried = send(&mut a, in_an_hour.clone()).await.unwrap();
    assert!(retried.scheduled && retried.deliveries.is_empty());

    // Nothing took a seq: a plain send now is alice's seq 1.
    send(&mut a, note(&["alice"], "now")).await.unwrap();
    let event = next_event(&mut watcher).await;
    assert_eq!((event.seq, notification(&event).title.as_str()), (1, "now"));
    assert_eq!(titles(&mut b).await, ["now"]);

    clock.advance(Duration::from_secs(3601));
    let event = next_event(&mut watcher).await;
    assert_eq!(
        (event.seq, notification(&event).title.as_str()),
        (2, "stand-up in 5 min")
    );
    assert_eq!(list(&mut a, "bob", false, 10).await.len(), 1);
    // Delivered: a retry now answers with the deliveries.
    let retried = send(&mut a, in_an_hour).await.unwrap();
    assert!(!retried.scheduled);
    let recipients: Vec<_> = retried
        .deliveries
        .iter()
        .map(|d| d.recipient.as_str())
        .collect();
    assert_eq!(recipients, ["alice", "bob"]);

    // The cancelled one never comes: past its time, the next event is a
    // plain send's.
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(100)).await; // a few scheduler runs
    send(&mut a, note(&["alice"], "after")).await.unwrap();
    let event = next_event(&mut watcher).await;
    assert_eq!(
        (event.seq, notification(&event).title.as_str()),
        (3, "after")
    );
    d.stop().await;
}

async fn bad_times_are_refused_naming_the_field_and_store_nothing(backend: Backend) {
    let clock = Clock::manual();
    let d = start(backend, &clock).await;
    let mut a = d.client(0).await;
    let now = clock.now();
    let minutes = |m: u64| Duration::from_secs(60 * m);
    let cases = [
        (
            "deliver_at",
            proto::SendNotificationRequest {
                deliver_at: at(now - minutes(5)),
                ..note(&["alice"], "x")
            },
        ),
        (
            "deliver_at",
            proto::SendNotificationRequest {
                deliver_at: at(now + Duration::from_secs(367 * 24 * 3600)),
                ..note(&["alice"], "x")
            },
        ),
        (
            "deliver_at",
            proto::SendNotificationRequest {
                deliver_at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -5,
                }),
                ..note(&["alice"], "x")
            },
        ),
        (
            "expires_at",
            proto::SendNotificationRequest {
                deliver_at: at(now + minutes(60)),
                expires_at: at(now + minutes(30)),
                ..note(&["alice"], "x")
            },
        ),
        (
            "expires_at",
            proto::SendNotificationRequest {
                expires_at: at(now - minutes(1)),
                ..note(&["alice"], "x")
            },
        ),
    ];
    for (field, request) in cases {
        refused_naming(&mut a, field, request).await;
    }
    assert_refused_naming(cancel(&mut a, "").await, "idempotency_key");
    // A deliver_at a few seconds in the past (clock skew) means now.
    let skewed = send(
        &mut a,
        proto::SendNotificationRequest {
            deliver_at: at(now - Duration::from_secs(5)),
            ..note(&["alice"], "now after all")
        },
    )
    .await
    .unwrap();
    assert!(!skewed.scheduled && skewed.deliveries.len() == 1);
    clock.advance(Duration::from_secs(400 * 24 * 3600));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        titles(&mut a).await,
        ["now after all"],
        "nothing else stored"
    );
    d.stop().await;
}

conformance!(
    expired_notifications_leave_at_once_then_are_deleted,
    scheduled_sends_are_delivered_when_due_and_cancellable,
    bad_times_are_refused_naming_the_field_and_store_nothing,
);

/// Sends due together beyond one transaction's bound (10,000 recipients)
/// are delivered over several scheduler runs, every one of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_due_set_is_delivered_in_bounded_transactions() {
    bounded(async {
        let clock = Clock::manual();
        let d = start(Backend::Postgres, &clock).await;
        let mut a = d.client(0).await;
        let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        for i in 0..11 {
            let sent = send(
                &mut a,
                proto::SendNotificationRequest {
                    deliver_at: at(clock.now() + Duration::from_secs(60)),
                    ..note(&names, &format!("digest {i}"))
                },
            )
            .await
            .unwrap();
            assert!(sent.scheduled);
        }
        clock.advance(Duration::from_secs(61));
        let db = d.db.as_ref().unwrap().connect().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM notifications), \
                            (SELECT count(*) FROM scheduled_sends)",
                    &[],
                )
                .await
                .unwrap();
            let (delivered, waiting): (i64, i64) = (row.get(0), row.get(1));
            if waiting == 0 {
                assert_eq!(delivered, 11_000, "each recipient of each send, once");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "delivery stalled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let last_seqs: Vec<i64> = db
            .query("SELECT DISTINCT last_seq FROM user_streams", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(last_seqs, [11], "every stream got all eleven, gap-free");
        d.stop().await;
    })
    .await;
}
