//! Group commit on PostgreSQL: concurrent sends share transactions, yet
//! every caller gets its own outcome, seqs stay gap-free per user, and
//! idempotency stays exact inside a batch.

mod common;

use std::collections::HashMap;

use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_transactions_and_keep_their_own_outcomes() {
    bounded(async {
        let d = Deployment::start(Backend::Postgres, 1).await;
        let db = d.db.as_ref().unwrap().connect().await;
        // A trigger that fails any content titled "poison": the whole batch that
        // carries it fails, and its batch-mates must still succeed.
        db.batch_execute(
            "CREATE FUNCTION reject_poison() RETURNS trigger AS $$ BEGIN \
               IF NEW.title = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; \
               RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER poison BEFORE INSERT ON contents \
               FOR EACH ROW EXECUTE FUNCTION reject_poison();",
        )
        .await
        .unwrap();

        let c = d.client(0).await;
        let mut calls = Vec::new();
        for i in 0..300 {
            let mut c = c.clone();
            let request = match i {
                // Ten retries of one keyed send, racing each other.
                0..10 => {
                    let mut r = note(&["alice", "bob"], "keyed");
                    r.idempotency_key = "invoice-7".into();
                    r
                }
                150 => note(&["carol"], "poison"),
                _ => note(
                    &[["alice", "bob", "carol", "dave"][i % 4]],
                    &format!("n{i}"),
                ),
            };
            calls.push(tokio::spawn(
                async move { (i, send(&mut c, request).await) },
            ));
        }
        let mut keyed = Vec::new();
        let mut ok = 0;
        for call in calls {
            let (i, outcome) = call.await.unwrap();
            match (i, outcome) {
                (0..10, Ok(r)) => keyed.push(r.deliveries),
                (150, Err(status)) => assert_eq!(status.code(), Code::Internal, "{status:?}"),
                (150, Ok(_)) => panic!("the poisoned send succeeded"),
                (_, Ok(_)) => ok += 1,
                (i, Err(status)) => panic!("send {i} failed: {status:?}"),
            }
        }
        assert_eq!(ok, 289);
        assert_eq!(keyed.len(), 10);
        assert!(keyed.windows(2).all(|w| w[0] == w[1]), "{keyed:?}");

        // Every user's seqs are 1..=n with no gap, one row per notification.
        let rows = db
            .query(
                "SELECT user_id, array_agg(seq ORDER BY seq) FROM notifications GROUP BY user_id",
                &[],
            )
            .await
            .unwrap();
        let seqs: HashMap<String, Vec<i64>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let expected = |n: i64| (1..=n).collect::<Vec<_>>();
        // alice and bob: 1 keyed + 72 or 73 plain; carol: 72 (the poison one
        // is not stored); dave: 72.
        let plain = |user: usize| (10..300).filter(|i| *i != 150 && i % 4 == user).count() as i64;
        assert_eq!(seqs["alice"], expected(1 + plain(0)));
        assert_eq!(seqs["bob"], expected(1 + plain(1)));
        assert_eq!(seqs["carol"], expected(plain(2)));
        assert_eq!(seqs["dave"], expected(plain(3)));

        // Batching happened: rows written by one transaction share its xmin.
        let transactions: i64 = db
            .query_one(
                "SELECT count(DISTINCT xmin::text)::bigint FROM notifications",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let stored: i64 = db
            .query_one("SELECT count(*) FROM notifications", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, 289 + 2);
        let sizes: Vec<i64> = db
            .query(
                "SELECT count(*) FROM notifications GROUP BY xmin::text ORDER BY min(id)",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            transactions < stored / 2,
            "{stored} notifications in {transactions} transactions: {sizes:?}"
        );

        // A transaction is begun by hand and committed in the batch's last
        // pipeline: none is left open on a pooled connection, not even by
        // the failed batches.
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(open, 0, "transactions left open on pooled connections");
        d.stop().await;
    })
    .await;
}
