//! Open connections, counted for the event log's writer ([`Senders`]).
//!
//! [`CountedListener`] wraps whatever `axum::serve` accepts from (the TCP listener, or a
//! shard's dealt connections) and hands out streams that count themselves open until hyper
//! drops them. The requests in flight are counted by the `count_requests` middleware.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use tally_core::senders::{OpenConnection, Senders};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A listener whose connections count themselves in `senders` while open.
pub struct CountedListener<L> {
    inner: L,
    senders: Arc<Senders>,
}

impl<L> CountedListener<L> {
    /// Counts the connections `inner` accepts in `senders`.
    pub fn new(inner: L, senders: Arc<Senders>) -> Self {
        Self { inner, senders }
    }
}

impl<L: Listener<Io = TcpStream>> Listener for CountedListener<L> {
    type Io = CountedStream;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (CountedStream, L::Addr) {
        let (stream, addr) = self.inner.accept().await;
        let stream = CountedStream {
            stream,
            _open: self.senders.connection_opened(),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<L::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream counted as open until it is dropped.
pub struct CountedStream {
    stream: TcpStream,
    _open: OpenConnection,
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
