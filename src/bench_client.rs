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
//! alternated pairs of runs the generator's CPU per single event went from 15–23 µs to 9–13 µs
//! in the closed loop and from 24–33 µs to 17–22 µs at half rate (docs/ARCHITECTURE.md,
//! Measured, "the load generator's own client").

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer larger than this is refused rather than waited for (the bench's answers are a few
/// hundred bytes; a batch's is one small object per event).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The whole of one request as it goes on the wire. The path's collection segment must already
/// be percent-encoded ([`encode_path_segment`]); a path, key or address that could break the
/// request's framing is refused.
pub fn encode_post(addr: &str, path: &str, authorization: &str, body: &[u8]) -> anyhow::Result<Bytes> {
    let unsafe_byte = |s: &str| s.bytes().any(|b| b <= b' ' || b == 0x7f);
    anyhow::ensure!(
        !unsafe_byte(path),
        "a request path with spaces or control characters: {path:?}"
    );
    anyhow::ensure!(
        !unsafe_byte(authorization) && !unsafe_byte(addr),
        "a key or address with spaces or control characters"
    );
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: {authorization}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    Ok(Bytes::from(request))
}

/// `segment` percent-encoded for a URL path: every byte but the unreserved ones (RFC 3986) as
/// `%XX`, so a collection name with spaces or slashes reaches the server as one segment.
pub fn encode_path_segment(segment: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
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
    unparsed: BytesMut,
    /// The last answer asked to close the connection: connect again before the next request
    /// (that connect then counts in the request's latency, as a client's would).
    reconnect_first: bool,
}

impl Connection {
    /// Connects to `addr` (host:port), with Nagle's algorithm off.
    pub async fn open(addr: &str) -> anyhow::Result<Self> {
        Ok(Self {
            addr: addr.to_string(),
            stream: connect(addr).await?,
            unparsed: BytesMut::with_capacity(8192),
            reconnect_first: false,
        })
    }

    /// Sends `request` (from [`encode_post`]) and reads its answer. The whole request is
    /// written before the answer is read, which suits a server that reads the body first (as
    /// Tally's does, even when it refuses it).
    pub async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Answer> {
        if self.reconnect_first {
            self.stream = connect(&self.addr).await?;
            self.unparsed.clear();
            self.reconnect_first = false;
        }
        self.stream.write_all(request).await?;
        loop {
            if let Some((answer, close)) = parse_answer(&mut self.unparsed)? {
                // One request at a time: anything after its answer means the framing slipped,
                // and the next request would be paired with the wrong answer.
                anyhow::ensure!(
                    self.unparsed.is_empty() || close,
                    "{} bytes after an answer to a single request",
                    self.unparsed.len()
                );
                self.reconnect_first = close;
                return Ok(answer);
            }
            anyhow::ensure!(
                self.unparsed.len() <= MAX_ANSWER_BYTES,
                "an answer of more than {MAX_ANSWER_BYTES} bytes"
            );
            self.unparsed.reserve(8192);
            if self.stream.read_buf(&mut self.unparsed).await? == 0 {
                anyhow::bail!("the server closed the connection before answering in full");
            }
        }
    }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A `1xx` answer comes before the final one.
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status)
}

/// Takes one complete final answer off the front of `buf` (skipping interim `1xx` ones), with
/// whether it asked to close the connection; `None` while it is incomplete.
fn parse_answer(buf: &mut BytesMut) -> anyhow::Result<Option<(Answer, bool)>> {
    loop {
        match parse_one(buf)? {
            Some((answer, _)) if is_interim(answer.status) => continue,
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
    // HTTP/1.0 closes after each answer unless it says otherwise.
    let mut close = response.version == Some(0);
    let mut content_length = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("");
        let has_token = |token: &str| value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token));
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.trim().parse::<usize>().context("a bad Content-Length")?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = has_token("chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = has_token("close") || (close && !has_token("keep-alive"));
        }
    }
    // How many bytes the answer takes, and its body when it is not those bytes as sent.
    let (used, dechunked) = if is_interim(status) || matches!(status, 204 | 304) {
        (head_len, None)
    } else if chunked {
        match dechunk(&buf[head_len..])? {
            Some((body, used)) => (head_len + used, Some(body)),
            None => return Ok(None),
        }
    } else if let Some(length) = content_length {
        anyhow::ensure!(length <= MAX_ANSWER_BYTES, "an answer of {length} bytes");
        if buf.len() - head_len < length {
            return Ok(None);
        }
        (head_len + length, None)
    } else {
        anyhow::bail!("an answer ({status}) without Content-Length or chunked framing")
    };
    // The answer's bytes split off without copying; a plain body is their tail.
    let frame = buf.split_to(used).freeze();
    let body = dechunked.unwrap_or_else(|| frame.slice(head_len..));
    Ok(Some((Answer { status, body }, close)))
}

/// A chunked body from the front of `buf` and the bytes it took; `None` while incomplete.
/// Decoded from the start again after each read: fine for the small answers it meets.
fn dechunk(buf: &[u8]) -> anyhow::Result<Option<(Bytes, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (data_at, size) = match httparse::parse_chunk_size(&buf[at..])
            .map_err(|_| anyhow::anyhow!("a malformed chunk size"))?
        {
            httparse::Status::Complete((n, size)) => (at + n, usize::try_from(size).unwrap_or(usize::MAX)),
            httparse::Status::Partial => return Ok(None),
        };
        anyhow::ensure!(
            size <= MAX_ANSWER_BYTES && body.len() + size <= MAX_ANSWER_BYTES,
            "a chunked answer of more than {MAX_ANSWER_BYTES} bytes"
        );
        // Each chunk's data, and the last (empty) chunk, end with CRLF; this server sends no
        // trailers, so anything else is refused rather than misread.
        let end = data_at + size + 2;
        if buf.len() < end {
            return Ok(None);
        }
        anyhow::ensure!(&buf[end - 2..end] == b"\r\n", "a chunk not ended by CRLF");
        if size == 0 {
            return Ok(Some((Bytes::from(body), end)));
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
        let request = encode_post("h:1", "/p", "KEY", b"{}").unwrap();
        assert_eq!(
            &request[..],
            b"POST /p HTTP/1.1\r\nhost: h:1\r\nauthorization: KEY\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn what_could_break_the_framing_is_encoded_or_refused() {
        assert_eq!(encode_path_segment("page views/2~x"), "page%20views%2F2~x");
        assert!(encode_post("h:1", "/p q", "KEY", b"").is_err());
        assert!(encode_post("h:1", "/p", "KEY\r\nx-evil: 1", b"").is_err());
    }

    #[test]
    fn bad_lengths_and_chunks_are_errors_not_panics() {
        let huge = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", usize::MAX);
        assert!(parse_answer(&mut BytesMut::from(huge.as_bytes())).is_err());
        let huge_chunk = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\n";
        assert!(parse_answer(&mut BytesMut::from(&huge_chunk[..])).is_err());
        let unterminated = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n";
        assert!(parse_answer(&mut BytesMut::from(&unterminated[..])).is_err());
    }

    #[test]
    fn close_is_read_from_any_token_and_from_http_1_0() {
        let close_of = |wire: &[u8]| parse_answer(&mut BytesMut::from(wire)).unwrap().unwrap().1;
        assert!(close_of(
            b"HTTP/1.1 204 No Content\r\nconnection: keep-alive, Close\r\n\r\n"
        ));
        assert!(!close_of(b"HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(close_of(b"HTTP/1.0 204 No Content\r\n\r\n"));
        assert!(!close_of(
            b"HTTP/1.0 204 No Content\r\nconnection: keep-alive\r\n\r\n"
        ));
    }

    /// A scripted server: answers a byte at a time with an interim answer first, then asks to
    /// close; the client must read both answers whole and connect again for the second request.
    #[tokio::test]
    async fn a_connection_reads_answers_in_pieces_and_reconnects_after_close() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            for answer in [
                &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 16\r\nconnection: close\r\n\r\n{\"created\":true}"[..],
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n"[..],
            ] {
                let (mut socket, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut request = vec![0; 4096];
                let n = socket.read(&mut request).await.unwrap();
                assert!(request[..n].starts_with(b"POST /p HTTP/1.1\r\n"));
                for byte in answer {
                    socket.write_all(&[*byte]).await.unwrap();
                    socket.flush().await.unwrap();
                }
                if accepted == 2 {
                    // Keep the second connection open until the client has its answer.
                    let _ = socket.read(&mut request).await;
                }
            }
            accepted
        });
        let mut connection = Connection::open(&addr).await.unwrap();
        let request = encode_post(&addr, "/p", "KEY", b"{}").unwrap();
        let first = connection.exchange(&request).await.unwrap();
        assert_eq!((first.status, &first.body[..]), (201, &b"{\"created\":true}"[..]));
        let second = connection.exchange(&request).await.unwrap();
        assert_eq!((second.status, &second.body[..]), (200, &b"[]"[..]));
        drop(connection);
        assert_eq!(server.await.unwrap(), 2);
    }

    /// One answer on the wire: its framing chosen by the test, its chunks cut where asked.
    fn wire_answer(status: u16, body: &[u8], chunk_cuts: &[usize], upper: bool) -> Vec<u8> {
        let name = |n: &str| {
            if upper {
                n.to_ascii_uppercase()
            } else {
                n.to_string()
            }
        };
        let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
        if chunk_cuts.is_empty() {
            out.extend(format!("{}: {}\r\n\r\n", name("content-length"), body.len()).bytes());
            out.extend_from_slice(body);
        } else {
            out.extend(format!("{}: chunked\r\n\r\n", name("transfer-encoding")).bytes());
            let mut at = 0;
            for &cut in chunk_cuts.iter().chain([&body.len()]) {
                let end = cut.clamp(at, body.len());
                if end > at {
                    out.extend(format!("{:x}\r\n", end - at).bytes());
                    out.extend_from_slice(&body[at..end]);
                    out.extend_from_slice(b"\r\n");
                }
                at = end;
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        out
    }

    proptest::proptest! {
        /// Any run of answers, framed either way and read in pieces cut anywhere, parses into
        /// the same answers, each only once it is whole.
        #[test]
        fn answers_read_in_any_pieces_parse_the_same(
            answers in proptest::collection::vec(
                (200u16..600, proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                 proptest::collection::vec(0usize..300, 0..4), proptest::bool::ANY),
                1..5),
            cuts in proptest::collection::vec(0usize..4000, 0..8),
        ) {
            let answers: Vec<_> = answers
                .into_iter()
                .map(|(status, body, chunks, upper)| {
                    // 204 and 304 carry no body.
                    if matches!(status, 204 | 304) {
                        (status, Vec::new(), Vec::new(), upper)
                    } else {
                        (status, body, chunks, upper)
                    }
                })
                .collect();
            let wire: Vec<u8> = answers
                .iter()
                .flat_map(|(status, body, chunks, upper)| wire_answer(*status, body, chunks, *upper))
                .collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut buf = BytesMut::new();
            let mut parsed = Vec::new();
            let mut fed = 0;
            for cut in cuts {
                buf.extend_from_slice(&wire[fed..cut]);
                fed = cut;
                while let Some((answer, _)) = parse_answer(&mut buf).unwrap() {
                    parsed.push(answer);
                }
            }
            proptest::prop_assert!(buf.is_empty());
            let expected: Vec<Answer> = answers
                .iter()
                .map(|(status, body, _, _)| Answer { status: *status, body: Bytes::from(body.clone()) })
                .collect();
            proptest::prop_assert_eq!(parsed, expected);
        }
    }
}
