//! Upgrading a v1 database: the v2 migrations move its data with nothing
//! lost. A database is migrated to the v1 schema only, filled the way v1
//! wrote it (notifications, a read event, an idempotency key, a stream
//! pruned by retention), then served by replicas of this version, which
//! migrate it: every notification, read state, stream position, pruned
//! position and idempotent response must come back as v1 stored it, and new
//! writes must continue after it.

mod common;

use common::*;
use herald::{
    notification::{NewNotification, SendLimits},
    proto::{self, event::Kind},
    store::postgres::migrate_to,
};

/// The v1 sender's request that used idempotency key `k1`.
fn keyed_request() -> proto::SendNotificationRequest {
    proto::SendNotificationRequest {
        idempotency_key: "k1".into(),
        ..note(&["alice"], "keyed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_database_is_upgraded_with_nothing_lost() {
    bounded(async {
        let db = TestDb::create().await;
        migrate_to(&db.url, Some(1)).await.unwrap();
        let sql = db.connect().await;
        let fingerprint = NewNotification::parse(keyed_request(), &SendLimits::default())
            .unwrap()
            .fingerprint("billing-service");
        // As v1 wrote them: alice has seqs 1, 2 (notifications; 1 read),
        // 3 (the read event), 4 (a notification with data); bob's seq 1
        // was pruned, seq 2 remains.
        sql.batch_execute(
            "INSERT INTO user_streams (tenant, user_id, last_seq, pruned_seq) VALUES \
               ('', 'alice', 4, 0), ('', 'bob', 2, 1); \
             INSERT INTO notifications (tenant, user_id, seq, type, title, body, data, created_at, read_at) \
             OVERRIDING SYSTEM VALUE VALUES \
               ('', 'alice', 1, 'test.event', 'first', 'b1', '{}', now() - interval '3 minutes', now()), \
               ('', 'alice', 2, 'test.event', 'keyed', 'body', '{\"k\":1}', now() - interval '2 minutes', NULL), \
               ('', 'bob', 2, 'test.event', 'for bob', '', '{}', now() - interval '2 minutes', NULL), \
               ('', 'alice', 4, 'other.event', 'fourth', 'b4', '{\"x\":[1,2]}', now() - interval '1 minute', NULL);",
        )
        .await
        .unwrap();
        let ids: Vec<i64> = sql
            .query("SELECT id FROM notifications ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (first, keyed, for_bob, fourth) = (ids[0], ids[1], ids[2], ids[3]);
        sql.execute(
            "INSERT INTO read_events (tenant, user_id, seq, notification_ids, up_to_seq) \
             VALUES ('', 'alice', 3, $1, 0)",
            &[&vec![first]],
        )
        .await
        .unwrap();
        let response = format!(r#"[{{"recipient":"alice","notification_id":{keyed},"seq":2}}]"#);
        sql.execute(
            "INSERT INTO idempotency_keys (tenant, sender, key, request, response) \
             VALUES ('', 'billing-service', 'k1', $1, $2::text::jsonb)",
            &[&fingerprint, &response],
        )
        .await
        .unwrap();
        drop(sql);

        let d = Deployment::start_on(db, 2).await;
        let mut a = d.client(0).await;
        let mut b = d.client(1).await;

        // The whole stream, in order, with content and read state.
        let mut stream = subscribe(&mut b, "alice", Some(0)).await;
        let (events, head) = until_caught_up(&mut stream).await;
        assert_eq!(head, 4);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let note_of = |e: &proto::Event| match &e.kind {
            Some(Kind::Notification(n)) => n.clone(),
            other => panic!("expected a notification, got {other:?}"),
        };
        let n4 = note_of(&events[3]);
        assert_eq!(
            (n4.id, n4.r#type.as_str(), n4.title.as_str(), n4.body.as_str(), n4.data.as_str()),
            (fourth, "other.event", "fourth", "b4", r#"{"x":[1,2]}"#)
        );
        assert_eq!(note_of(&events[0]).id, first);
        match &events[2].kind {
            Some(Kind::Read(r)) => assert_eq!(r.notification_ids, [first]),
            other => panic!("expected the read event, got {other:?}"),
        }
        // Listing and counts keep read state.
        let listed = list(&mut a, "alice", false, 10).await;
        let summary: Vec<_> = listed.iter().map(|n| (n.id, n.seq, n.read)).collect();
        assert_eq!(summary, [(fourth, 4, false), (keyed, 2, false), (first, 1, true)]);
        assert_eq!(unread(&mut a, "alice").await, 2);

        // bob's pruned position still gets resync; after it, his stream is
        // intact.
        let mut bob = subscribe(&mut a, "bob", Some(0)).await;
        let resync = next_event(&mut bob).await;
        assert!(matches!(resync.kind, Some(Kind::Resync(_))), "{resync:?}");
        assert_eq!(resync.seq, 2);
        let mut bob = subscribe(&mut a, "bob", Some(1)).await;
        let (events, _) = until_caught_up(&mut bob).await;
        assert_eq!(note_of(&events[0]).id, for_bob);

        // The v1 idempotency key still answers with v1's response.
        let replay = send(&mut a, keyed_request()).await.unwrap();
        assert_eq!(replay.deliveries[0].notification_id, keyed);
        assert_eq!(replay.deliveries[0].seq, 2);

        // New writes continue after v1's ids and seqs.
        let sent = send(&mut a, note(&["alice", "bob"], "new")).await.unwrap();
        let max_v1 = *ids.iter().max().unwrap();
        assert!(sent.deliveries.iter().all(|d| d.notification_id > max_v1));
        assert_eq!(
            sent.deliveries.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [5, 3]
        );
        let live = next_event(&mut stream).await;
        assert_eq!(live.seq, 5);
        assert_eq!(note_of(&live).title, "new");
        d.stop().await;
    })
    .await;
}
