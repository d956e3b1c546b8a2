//! A TCP proxy the test controls, between a client and a server (a replica
//! and PostgreSQL, or a gRPC client and a replica): it can forward, refuse
//! (close every connection and every new one), or go silent (keep
//! connections open but forward nothing, like a half-open socket) — for all
//! connections, only for those open now (new ones forward: a reconnect gets
//! through), or only in one direction (requests arrive and replies are
//! lost, or requests are lost and what the server pushes arrives).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

const FORWARD: u8 = 0;
const REFUSE: u8 = 1;
const SILENT: u8 = 2;

/// One proxied connection: its two pumps and its half-open switch.
struct Conn {
    pumps: [AbortHandle; 2],
    /// Neither direction is read any more (see `silence_existing`).
    half_open: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    mode: AtomicU8,
    /// Server-to-client bytes of every connection, new ones too, are
    /// swallowed.
    replies_silent: Arc<AtomicBool>,
    /// Client-to-server bytes of every connection, new ones too, are
    /// swallowed.
    requests_silent: Arc<AtomicBool>,
    accepted: AtomicUsize,
    connections: Mutex<Vec<Conn>>,
}

/// A running proxy on 127.0.0.1; stops when dropped.
pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: AbortHandle,
}

impl TcpProxy {
    /// Proxies a random local port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.mode.load(Ordering::Acquire) == REFUSE {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                st.accepted.fetch_add(1, Ordering::AcqRel);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let half_open = Arc::new(AtomicBool::new(false));
                let up = tokio::spawn(pump(
                    cr,
                    sw,
                    st.clone(),
                    half_open.clone(),
                    st.requests_silent.clone(),
                ));
                let down = tokio::spawn(pump(
                    sr,
                    cw,
                    st.clone(),
                    half_open.clone(),
                    st.replies_silent.clone(),
                ));
                st.connections.lock().unwrap().push(Conn {
                    pumps: [up.abort_handle(), down.abort_handle()],
                    half_open,
                });
            }
        })
        .abort_handle();
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Forwards bytes again (new connections are accepted); undoes
    /// [`TcpProxy::silence`] and [`TcpProxy::silence_replies`], not
    /// [`TcpProxy::silence_existing`].
    pub fn forward(&self) {
        self.state.replies_silent.store(false, Ordering::Release);
        self.state.mode.store(FORWARD, Ordering::Release);
    }

    /// Closes every connection and refuses new ones.
    pub fn refuse(&self) {
        self.state.mode.store(REFUSE, Ordering::Release);
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.pumps.iter().for_each(AbortHandle::abort);
        }
    }

    /// Keeps connections open but forwards nothing either way, on every
    /// connection, new ones included.
    pub fn silence(&self) {
        self.state.mode.store(SILENT, Ordering::Release);
    }

    /// Makes every connection open now half-open, for good: it stays
    /// open, and nothing more is read from either end, so each end's
    /// writes pile up in socket buffers and then block, as when the peer
    /// vanished without a FIN or RST. Connections made afterwards forward
    /// normally (a client that gives up on a dead connection and
    /// reconnects gets through).
    pub fn silence_existing(&self) {
        for c in self.state.connections.lock().unwrap().iter() {
            c.half_open.store(true, Ordering::Release);
        }
    }

    /// Swallows everything the server sends to clients, on every
    /// connection (new ones too), while requests still reach it: the
    /// server acts on a call, its reply is lost.
    pub fn silence_replies(&self) {
        self.state.replies_silent.store(true, Ordering::Release);
    }

    /// Swallows everything clients send, on every connection (new ones
    /// too), while the server's messages still reach them: a client's
    /// requests go unanswered, what the server pushes (NOTIFYs) arrives.
    pub fn silence_requests(&self) {
        self.state.requests_silent.store(true, Ordering::Release);
    }

    /// Connections accepted (and forwarded to the server) so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Acquire)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.refuse();
    }
}

/// Copies `from` to `to` per the proxy's mode. `half_open`: stop reading
/// (what was read meanwhile is dropped); `swallow`: read and drop.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
    half_open: Arc<AtomicBool>,
    swallow: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if half_open.load(Ordering::Acquire) {
            // Hold both halves open, read nothing more.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if swallow.load(Ordering::Acquire) {
            continue; // swallowed
        }
        match state.mode.load(Ordering::Acquire) {
            SILENT => continue, // swallowed
            REFUSE => return,
            _ => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
