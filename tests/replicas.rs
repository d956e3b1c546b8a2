//! Multi-replica behaviour on PostgreSQL: fan-out across replicas, several
//! devices on several replicas, and a LISTEN connection killed mid-load.

mod common;

use std::time::Duration;

use common::*;
use herald::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_through_one_replica_reaches_streams_on_every_replica() {
    bounded(async {
        let d = Deployment::start(Backend::Postgres, 3).await;
        let mut a = d.client(0).await;
        let mut b = d.client(1).await;
        let mut c = d.client(2).await;
        // alice has a device on B and one on C; bob one on A.
        let mut alice_b = subscribe(&mut b, "alice", Some(0)).await;
        let mut alice_c = subscribe(&mut c, "alice", Some(0)).await;
        let mut bob_a = subscribe(&mut a, "bob", Some(0)).await;
        for s in [&mut alice_b, &mut alice_c, &mut bob_a] {
            until_caught_up(s).await;
        }
        for i in 0..20 {
            let via = [&mut a, &mut b, &mut c];
            let client = via.into_iter().nth(i % 3).unwrap();
            send(client, note(&["alice", "bob"], &format!("n{i}")))
                .await
                .unwrap();
        }
        for (name, stream) in [
            ("alice@B", &mut alice_b),
            ("alice@C", &mut alice_c),
            ("bob@A", &mut bob_a),
        ] {
            let seqs = seqs_through(stream, 20).await;
            assert_exactly_once_in_order(&seqs, 20, name);
        }
        d.stop().await;
    })
    .await;
}

/// Rounds of: kill every replica's LISTEN connection, then send a burst
/// through another replica. The last burst commits while the listener is
/// down and nothing follows it, so only the catch-up after reconnecting can
/// deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listen_connection_loses_nothing() {
    bounded(async {
        let d = Deployment::start(Backend::Postgres, 2).await;
        let mut a = d.client(0).await;
        let mut b = d.client(1).await;
        let mut stream = subscribe(&mut b, "alice", Some(0)).await;
        until_caught_up(&mut stream).await;

        let mut sent = 0u64;
        for burst in [40, 40, 40, 40, 3] {
            assert!(
                d.kill_listeners().await > 0,
                "no listener connection to kill"
            );
            for _ in 0..burst {
                send(&mut a, note(&["alice"], &format!("n{sent}")))
                    .await
                    .expect("send ok");
                sent += 1;
            }
            // Let the listeners come back before the next round.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let seqs = seqs_through(&mut stream, sent).await;
        assert_exactly_once_in_order(&seqs, sent, "subscriber during listener kills");
        d.stop().await;
    })
    .await;
}

/// The database is "restored" onto another cluster (simulated by changing
/// the cluster identity recorded with the epoch) and every connection is
/// lost, as in a restore or a failover: the replicas draw a new epoch, and a
/// stream that was live in the old history gets `resync` with the new epoch
/// at once (without waiting for a new event), then goes on live; a client
/// resuming from an old position gets `resync` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_database_changes_the_epoch_and_streams_resync() {
    bounded(async {
        let d = Deployment::start(Backend::Postgres, 2).await;
        let mut a = d.client(0).await;
        let mut b = d.client(1).await;
        for i in 0..3 {
            send(&mut a, note(&["alice"], &format!("n{i}")))
                .await
                .unwrap();
        }
        let mut stream = subscribe(&mut b, "alice", Some(0)).await;
        let (backlog, _) = until_caught_up(&mut stream).await;
        let old_epoch = backlog[0].epoch;

        let db = d.db.as_ref().unwrap().connect().await;
        db.execute("UPDATE herald_meta SET cluster = 'elsewhere/00000001'", &[])
            .await
            .unwrap();
        d.kill_listeners().await;

        let resync = next_event(&mut stream).await;
        assert!(
            matches!(resync.kind, Some(proto::event::Kind::Resync(_))),
            "{resync:?}"
        );
        let new_epoch = resync.epoch;
        assert_ne!(new_epoch, old_epoch);
        assert_eq!(resync.seq, 3);
        let row = db
            .query_one("SELECT epoch FROM herald_meta", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0) as u64, new_epoch);

        send(&mut a, note(&["alice"], "after")).await.unwrap();
        let live = next_event(&mut stream).await;
        assert_eq!((live.seq, live.epoch), (4, new_epoch));

        let mut old = b
            .subscribe(authed(
                proto::SubscribeRequest {
                    after_seq: Some(2),
                    epoch: old_epoch,
                    ..Default::default()
                },
                &token("alice", "", ""),
            ))
            .await
            .unwrap()
            .into_inner();
        let resync = next_event(&mut old).await;
        assert!(matches!(resync.kind, Some(proto::event::Kind::Resync(_))));
        assert_eq!((resync.seq, resync.epoch), (4, new_epoch));
        d.stop().await;
    })
    .await;
}

/// After the LISTEN connection is lost, every local stream catches up from
/// the store at once. With 1,000 streams and a pool of 2 connections whose
/// checkout gives up after 50 ms, unbounded catch-up reads would queue on
/// the pool past that timeout and end streams with UNAVAILABLE; spread
/// under the replica's store-read permits, every stream survives and
/// receives what comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_catch_up_storm_does_not_exhaust_the_pool() {
    const STREAMS: usize = 1_000;
    bounded(async {
        let d = Deployment::start_with(Backend::Postgres, 1, |c| {
            c.pool_size = 2;
            c.pool_timeout = Duration::from_millis(50);
            c.streams.per_user = 4;
            // All the streams and the send share one HTTP/2 connection.
            c.transport.max_concurrent_streams = 2 * STREAMS as u32;
        })
        .await;
        let c = d.client(0).await;
        let users: Vec<String> = (0..STREAMS).map(|i| format!("storm{i}")).collect();
        let mut streams = Vec::with_capacity(STREAMS);
        for chunk in users.chunks(10) {
            let opened = chunk.iter().map(|u| {
                let mut c = c.clone();
                async move {
                    let mut s = subscribe(&mut c, u, Some(0)).await;
                    until_caught_up(&mut s).await;
                    s
                }
            });
            streams.extend(futures_util::future::join_all(opened).await);
        }

        for _ in 0..2 {
            d.kill_listeners().await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }

        let recipients: Vec<&str> = users.iter().map(String::as_str).collect();
        send(&mut c.clone(), note(&recipients, "after the storm"))
            .await
            .expect("send after the storm");
        for (i, s) in streams.iter_mut().enumerate() {
            let event = next_event(s).await;
            assert_eq!(event.seq, 1, "stream {i}: {event:?}");
        }
        d.stop().await;
    })
    .await;
}

/// Retention on two replicas at once, every 50 ms, while both take sends:
/// batches lock stream rows in key order like every writer and take turns
/// under the advisory lock, so no send fails (a deadlock would surface as
/// UNAVAILABLE) and every stream stays gap-free from what retention left:
/// a subscriber resuming from 0 gets `resync` or a contiguous run of seqs,
/// and once everything is pruned every unread and unseen counter is exactly
/// 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_every_replica_races_sends_without_deadlock_or_holes() {
    bounded(async {
        let d = Deployment::start_with(Backend::Postgres, 2, |c| {
            c.retention = Duration::from_millis(200);
            c.prune_interval = Duration::from_millis(50);
        })
        .await;
        let users: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        let mut senders = Vec::new();
        for s in 0..4 {
            let mut c = d.client(s % 2).await;
            let users = users.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..150 {
                    // Overlapping recipient sets, in different orders.
                    let mut to: Vec<&str> = users.iter().map(String::as_str).collect();
                    let n = to.len();
                    to.rotate_left((s * 5 + i) % n);
                    to.truncate(8);
                    send(&mut c, note(&to, &format!("{s}-{i}")))
                        .await
                        .expect("no send fails while retention runs");
                }
            }));
        }
        for s in senders {
            s.await.unwrap();
        }
        let mut c = d.client(0).await;
        for u in &users {
            let mut stream = subscribe(&mut c, u, Some(0)).await;
            let (events, head) = until_caught_up(&mut stream).await;
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            let resynced = events
                .first()
                .is_some_and(|e| matches!(e.kind, Some(proto::event::Kind::Resync(_))));
            if !resynced {
                let first = seqs.first().copied().unwrap_or(head + 1);
                let want: Vec<u64> = (first..=head).collect();
                assert_eq!(seqs, want, "{u}: a contiguous run up to the head");
            }
        }
        // Once retention has deleted everything, every unread and unseen
        // counter is back to exactly 0: it lost what was pruned, no more, no less.
        let db = d.db.as_ref().unwrap().connect().await;
        until_all_pruned(&db).await;
        let row = db
            .query_one(
                "SELECT min(unread), max(unread), min(unseen), max(unseen) FROM user_streams",
                &[],
            )
            .await
            .unwrap();
        let counters: Vec<i64> = (0..4).map(|i| row.get(i)).collect();
        assert_eq!(counters, [0, 0, 0, 0], "unread and unseen");
        d.stop().await;
    })
    .await;
}

/// The liveness probe runs beside routing: when the probe's own request
/// cannot get through (the listener's requests are lost, while what the
/// server pushes still arrives), events keep being routed at once, and as
/// long as notifications keep arriving the connection is not declared deaf
/// (a reconnect would make every stream re-read the store). Sends go on
/// for three probe timeouts; each must arrive promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_probe_stalls_neither_routing_nor_the_connection() {
    bounded(async {
        let db = TestDb::create().await;
        let proxy = proxy::TcpProxy::start(db.server_addr()).await;
        let mut config = test_config(Some(db.url.clone()));
        config.listener_database_url = Some(db.url_via(proxy.addr));
        config.listener.ping_interval = Duration::from_millis(100);
        config.listener.ping_timeout = Duration::from_millis(600);
        let replica = herald::server::start(config).await.unwrap();
        let mut c = client(replica.addr).await;
        let mut stream = subscribe(&mut c, "alice", Some(0)).await;
        until_caught_up(&mut stream).await;

        proxy.silence_requests();
        let connections = proxy.accepted();
        for i in 1..=36u64 {
            let sent = tokio::time::Instant::now();
            send(&mut c, note(&["alice"], &format!("n{i}")))
                .await
                .unwrap();
            let event = next_event(&mut stream).await;
            assert_eq!(event.seq, i);
            let took = sent.elapsed();
            assert!(
                took < Duration::from_millis(300),
                "event {i} took {took:?}: routing waited for the probe"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            proxy.accepted(),
            connections,
            "the listener reconnected although notifications kept arriving"
        );
        replica.stop(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}
