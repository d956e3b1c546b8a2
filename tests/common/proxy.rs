//! A TCP proxy the test controls, between a replica and PostgreSQL: it can
//! forward, refuse (close every connection and every new one), or go silent
//! (keep connections open but forward nothing, like a half-open socket).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
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

#[derive(Default)]
struct State {
    mode: AtomicU8,
    connections: Mutex<Vec<AbortHandle>>,
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
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pump(cr, sw, st.clone()));
                let down = tokio::spawn(pump(sr, cw, st.clone()));
                let mut conns = st.connections.lock().unwrap();
                conns.push(up.abort_handle());
                conns.push(down.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Forwards bytes again (new connections are accepted).
    pub fn forward(&self) {
        self.state.mode.store(FORWARD, Ordering::Release);
    }

    /// Closes every connection and refuses new ones.
    pub fn refuse(&self) {
        self.state.mode.store(REFUSE, Ordering::Release);
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Keeps connections open but forwards nothing either way.
    pub fn silence(&self) {
        self.state.mode.store(SILENT, Ordering::Release);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.refuse();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
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
