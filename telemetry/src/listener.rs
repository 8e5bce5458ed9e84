//! A listener that bounds what anonymous peers can hold: at most
//! `max_connections` open at once (the next is accepted and closed at once,
//! so the backlog never fills and the process never runs out of
//! descriptors), and a connection that sends nothing for `idle_timeout` is
//! closed (an idle socket, a stalled TLS handshake, a kept-alive scrape
//! connection between scrapes).
//!
//! It never reads or writes on its own: it only counts time between the
//! peer's bytes. Servers that need a connection to stay open without client
//! bytes (gRPC streams) must keep it talking, e.g. with HTTP/2 keepalive
//! pings at an interval well below `idle_timeout`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// Raises this process's open-files soft limit to its hard limit (a
/// container's usual soft 1024 is far below what a server with thousands of
/// peers needs); returns the limit now in force (`u64::MAX`: unlimited).
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // The soft limit is never above the hard one, so unequal means lower
    // (None is unlimited).
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// The bounds of a [`GuardedListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for Guard {
    /// The `/metrics` servers' bounds: a scraper or two and a few curls.
    fn default() -> Self {
        Self {
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Called when the guard closes a connection: `"connection_cap"` or `"idle"`.
pub type OnClose = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A TCP listener under a [`Guard`].
pub struct GuardedListener {
    listener: TcpListener,
    guard: Guard,
    permits: Arc<Semaphore>,
    on_close: OnClose,
}

impl GuardedListener {
    pub fn new(listener: TcpListener, guard: Guard, on_close: OnClose) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(guard.max_connections)),
            guard,
            on_close,
        }
    }

    /// The next connection within the cap. Connections past the cap are
    /// closed as they arrive; accept errors (EMFILE and the like) are
    /// retried after a short pause.
    pub async fn accept_guarded(&mut self) -> (GuardedStream, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        GuardedStream::new(stream, permit, self.guard.idle_timeout, &self.on_close),
                        peer,
                    );
                }
                Err(_) => {
                    (self.on_close)("connection_cap");
                    drop(stream);
                }
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl Future<Output = (Self::Io, Self::Addr)> + Send {
        self.accept_guarded()
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        GuardedListener::local_addr(self)
    }
}

/// The peer of a guarded connection, as axum's `ConnectInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// A connection accepted by a [`GuardedListener`]: holds its place under
/// the cap and fails its next read once the peer was silent `idle_timeout`.
pub struct GuardedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    on_close: OnClose,
}

impl GuardedStream {
    fn new(
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        idle_timeout: Duration,
        on_close: &OnClose,
    ) -> Self {
        Self {
            stream,
            _permit: permit,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            on_close: Arc::clone(on_close),
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let deadline = Instant::now() + self.idle_timeout;
                    self.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    (self.on_close)("idle");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer silent past the idle timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn counting() -> (OnClose, Arc<[AtomicUsize; 2]>) {
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let c = Arc::clone(&counts);
        let on_close: OnClose = Arc::new(move |why| {
            c[usize::from(why == "idle")].fetch_add(1, SeqCst);
        });
        (on_close, counts)
    }

    async fn listener(guard: Guard) -> (GuardedListener, SocketAddr, Arc<[AtomicUsize; 2]>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (on_close, counts) = counting();
        (GuardedListener::new(tcp, guard, on_close), addr, counts)
    }

    /// Reads from the client side until EOF or error; true when the server
    /// closed the connection.
    async fn closed_by_server(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit};
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert_eq!(raise_open_files_limit(), hard);
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, now.maximum);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let (mut listener, addr, counts) = listener(Guard {
            max_connections: 2,
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let first = listener.accept_guarded().await;
        let second = listener.accept_guarded().await;
        // The third is accepted and closed inside the next accept, which then
        // waits for a connection within the cap.
        let pending = tokio::time::timeout(Duration::from_millis(200), listener.accept_guarded());
        assert!(pending.await.is_err());
        assert!(closed_by_server(&mut c).await);
        assert_eq!(counts[0].load(SeqCst), 1);
        // A place freed is taken by the next connection.
        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        let accepted =
            tokio::time::timeout(Duration::from_secs(5), listener.accept_guarded()).await;
        assert!(accepted.is_ok());
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_closed_after_the_idle_timeout() {
        let (mut listener, addr, counts) = listener(Guard {
            max_connections: 4,
            idle_timeout: Duration::from_secs(10),
        })
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept_guarded().await;
        let mut buf = [0u8; 8];
        // Bytes within the timeout keep it open; each restarts the clock.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(9)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        }
        let error = server.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(counts[1].load(SeqCst), 1);
    }
}
