//! Async sockets (feature `tokio`): [`TcpStream`] is tokio's `AsyncRead` and `AsyncWrite`,
//! and listeners and UDP sockets have `async` forms of their calls.
//!
//! The stack's background thread ([`Stack::connect`](super::Stack::connect)) wakes the tasks
//! waiting on it whenever it changed; any tokio runtime (even a current-thread one) works, and
//! the sockets need no reactor of tokio's.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use netchannel::stack::{Stack, TcpListener};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let stack = Stack::connect(netchannel::nexus::DEFAULT_SOCKET)?;
//! let listener = TcpListener::bind(&stack, "0.0.0.0:8080".parse().unwrap())?;
//! let (mut conn, _) = listener.accept_async().await?;
//! let mut req = [0u8; 512];
//! let n = conn.read(&mut req).await?;
//! conn.write_all(&req[..n]).await?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tcp::{TcpListener, TcpStream, try_accept, try_read, try_write};
use super::udp::{UdpSocket, try_recv_from, try_send_to};

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read_shut() {
            return Poll::Ready(Ok(()));
        }
        let (shared, h) = (self.stack().shared().clone(), self.handle());
        let dst = buf.initialize_unfilled();
        match shared.poll_op(cx, |g| try_read(g, h, dst)) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let (shared, h) = (self.stack().shared().clone(), self.handle());
        shared.poll_op(cx, |g| try_write(g, h, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown(std::net::Shutdown::Write))
    }
}

impl TcpListener {
    /// Waits for a connection, without blocking the thread.
    pub async fn accept_async(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let shared = self.stack().shared().clone();
        let local = self.local_addr()?;
        let handshake = self.handshake();
        let (handle, peer) = std::future::poll_fn(|cx| {
            // The pool first, then the stack: the order every path takes.
            let mut pool = self.pool();
            shared.poll_op(cx, |g| try_accept(g, &mut pool, local, handshake))
        })
        .await?;
        Ok((self.stream(handle, peer), peer))
    }
}

impl UdpSocket {
    /// Receives one datagram, without blocking the thread.
    pub async fn recv_from_async(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let shared = self.stack().shared().clone();
        let (h, peer) = (self.handle(), self.peer());
        std::future::poll_fn(|cx| shared.poll_op(cx, |g| try_recv_from(g, h, buf, peer))).await
    }

    /// Sends one datagram to `addr`, without blocking the thread.
    pub async fn send_to_async(&self, buf: &[u8], addr: SocketAddr) -> io::Result<usize> {
        let shared = self.stack().shared().clone();
        let h = self.handle();
        std::future::poll_fn(|cx| shared.poll_op(cx, |g| try_send_to(g, h, buf, addr))).await
    }
}
