//! The ingest benchmark's HTTP/1.1 client: one keep-alive connection, one request at a time,
//! each request's bytes written whole from a buffer made before the run.
//!
//! Why not hyper's client: on the 2-core development machine the load generator shares the
//! cores with the server it measures, so every microsecond it spends per request is taken from
//! the server and shows up in the latency it reports. hyper's client connection is two tasks (the
//! sender and the connection driver) with a channel between them, builds a header map for every
//! request and sends each answer back through a oneshot. Here the task that waits for its turn
//! writes the request and reads the answer itself, as `wrk` does, and reads only what the
//! benchmark needs: the status, and a body framed by `Content-Length` or chunked. In seven
//! alternated runs the generator's CPU per single event went from 15–23 µs to 9–13 µs in the
//! closed loop and from 24–33 µs to 17–22 µs at half rate (docs/ARCHITECTURE.md, Measured,
//! "the load generator's own client").

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The whole of one request as it goes on the wire.
pub fn encode_post(addr: &str, path: &str, authorization: &str, body: &[u8]) -> Bytes {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: {authorization}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    Bytes::from(request)
}

/// An answer: its status and its (de-chunked) body.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// One keep-alive connection to the server.
pub struct Connection {
    addr: String,
    stream: TcpStream,
    /// Bytes read and not yet part of an answer.
    read: BytesMut,
    /// The last answer said `connection: close`: connect again before the next request.
    closed: bool,
}

impl Connection {
    pub async fn open(addr: &str) -> anyhow::Result<Self> {
        Ok(Self {
            addr: addr.to_string(),
            stream: connect(addr).await?,
            read: BytesMut::with_capacity(8192),
            closed: false,
        })
    }

    /// Sends `request` (from [`encode_post`]) and reads its answer.
    pub async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Answer> {
        if self.closed {
            self.stream = connect(&self.addr).await?;
            self.read.clear();
            self.closed = false;
        }
        self.stream.write_all(request).await?;
        loop {
            if let Some((answer, close)) = parse_answer(&mut self.read)? {
                self.closed = close;
                return Ok(answer);
            }
            self.read.reserve(8192);
            if self.stream.read_buf(&mut self.read).await? == 0 {
                anyhow::bail!("the server closed the connection before answering in full");
            }
        }
    }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {addr}: {e}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Takes one complete final answer off the front of `buf` (skipping interim `1xx` ones), with
/// whether it asked to close the connection; `None` while it is incomplete.
fn parse_answer(buf: &mut BytesMut) -> anyhow::Result<Option<(Answer, bool)>> {
    loop {
        match parse_one(buf)? {
            Some((answer, _)) if (100..200).contains(&answer.status) => continue,
            parsed => return Ok(parsed),
        }
    }
}

/// Takes one complete answer, interim or final, off the front of `buf`.
fn parse_one(buf: &mut BytesMut) -> anyhow::Result<Option<(Answer, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    let mut content_length = None;
    let mut chunked = false;
    let mut close = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>()?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Some((Bytes::new(), head_len))
    } else if chunked {
        dechunk(&buf[head_len..])?.map(|(body, used)| (body, head_len + used))
    } else if let Some(length) = content_length {
        (buf.len() >= head_len + length).then(|| {
            (
                Bytes::copy_from_slice(&buf[head_len..head_len + length]),
                head_len + length,
            )
        })
    } else {
        anyhow::bail!("an answer ({status}) without Content-Length or chunked framing")
    };
    Ok(body.map(|(body, used)| {
        buf.advance(used);
        (Answer { status, body }, close)
    }))
}

/// A chunked body from the front of `buf` and the bytes it took; `None` while incomplete.
fn dechunk(buf: &[u8]) -> anyhow::Result<Option<(Bytes, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (data_at, size) = match httparse::parse_chunk_size(&buf[at..])
            .map_err(|_| anyhow::anyhow!("a malformed chunk size"))?
        {
            httparse::Status::Complete((n, size)) => (at + n, size as usize),
            httparse::Status::Partial => return Ok(None),
        };
        if size == 0 {
            // No trailers from this server: the last chunk ends with an empty line.
            return Ok((buf.len() >= data_at + 2).then(|| (Bytes::from(body), data_at + 2)));
        }
        let end = data_at.saturating_add(size).saturating_add(2);
        if buf.len() < end {
            return Ok(None);
        }
        body.extend_from_slice(&buf[data_at..end - 2]);
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(wire: &[u8]) -> Vec<Answer> {
        let mut buf = BytesMut::from(wire);
        let mut answers = Vec::new();
        while let Some((answer, _)) = parse_answer(&mut buf).unwrap() {
            answers.push(answer);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        answers
    }

    #[test]
    fn answers_framed_every_way_are_read_and_split() {
        let wire = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n\
                     {\"created\":true}\
                     HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n\
                     HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        let answers = parse_all(wire);
        assert_eq!(
            answers,
            vec![
                Answer {
                    status: 201,
                    body: Bytes::from_static(b"{\"created\":true}")
                },
                Answer {
                    status: 204,
                    body: Bytes::new()
                },
                Answer {
                    status: 200,
                    body: Bytes::from_static(b"[1,2]")
                },
            ]
        );
    }

    #[test]
    fn an_answer_cut_anywhere_waits_for_the_rest() {
        let wire: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert!(parse_answer(&mut buf).unwrap().is_none(), "complete at {cut}");
            assert_eq!(buf.len(), cut, "consumed at {cut}");
        }
    }

    #[test]
    fn close_and_missing_framing_are_reported() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let (answer, close) = parse_answer(&mut buf).unwrap().unwrap();
        assert_eq!((answer.status, close), (413, true));
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\n\r\nbody"[..]);
        assert!(parse_answer(&mut buf).is_err());
    }

    #[test]
    fn an_interim_answer_is_skipped() {
        let answers =
            parse_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(
            answers,
            vec![Answer {
                status: 201,
                body: Bytes::from_static(b"{}")
            }]
        );
    }

    #[test]
    fn a_request_is_encoded_with_its_length() {
        let request = encode_post("h:1", "/p", "KEY", b"{}");
        assert_eq!(
            &request[..],
            b"POST /p HTTP/1.1\r\nhost: h:1\r\nauthorization: KEY\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}
