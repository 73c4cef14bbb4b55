//! The session after login: bytes flow both ways as they arrive, through
//! one fixed buffer per direction. Message boundaries are followed by
//! arithmetic on the 5-byte headers; only the messages statement tracking
//! needs have their first bytes looked at (`tracking`). No message is ever
//! held whole, so a 1 GiB DataRow or COPY stream costs one buffer.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::tracking::Tracker;
use super::wire;
use crate::audit::AuditLog;
use crate::sessions::{Ended, Tally};

/// One read's worth; PostgreSQL's own socket buffers are 8 KiB.
const CHUNK: usize = 16 * 1024;

/// Follows the message boundaries of one direction.
#[derive(Default)]
pub struct Frames {
    head: [u8; 5],
    have: usize,
    tag: u8,
    /// Body bytes of the current message still to pass.
    remaining: usize,
    in_body: bool,
    /// How much of the current body to keep for `seen` (0: none).
    peek: usize,
    peeked: Vec<u8>,
}

/// A length field under 4: not PostgreSQL.
#[derive(Debug)]
pub struct Malformed;

impl Frames {
    pub fn at_boundary(&self) -> bool {
        !self.in_body && self.have == 0
    }

    /// Follows `data`. `peek` says how many body bytes of a message with
    /// this tag `seen` wants; `seen` gets each message's tag with those
    /// bytes once they have passed (at once when it wants none).
    pub fn feed(
        &mut self,
        mut data: &[u8],
        peek: impl Fn(u8) -> usize,
        mut seen: impl FnMut(u8, &[u8]),
    ) -> Result<(), Malformed> {
        while !data.is_empty() {
            if !self.in_body {
                let take = (5 - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < 5 {
                    break;
                }
                self.have = 0;
                self.tag = self.head[0];
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                if len < 4 {
                    return Err(Malformed);
                }
                self.remaining = len as usize - 4;
                self.peek = peek(self.tag);
                self.peeked.clear();
                if self.peek == 0 || self.remaining == 0 {
                    seen(self.tag, &[]);
                    self.peek = 0;
                }
                self.in_body = self.remaining > 0;
            } else {
                let take = self.remaining.min(data.len());
                if self.peeked.len() < self.peek {
                    let room = (self.peek - self.peeked.len()).min(take);
                    self.peeked.extend_from_slice(&data[..room]);
                }
                self.remaining -= take;
                data = &data[take..];
                if self.remaining == 0 {
                    self.in_body = false;
                    if self.peek > 0 {
                        seen(self.tag, &self.peeked);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Relays until either side ends or `stop` resolves; `stop` is only acted
/// on between messages to the client, so 57P01 never lands inside one.
/// Statement records wait for the audit writer like request records do.
pub async fn relay<C, S, F>(
    client: C,
    server: S,
    tally: &mut Tally,
    tracker: &Tracker<'_>,
    audit: &AuditLog,
    stop: F,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = (&'static str, String)>,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let (mut up_bytes, mut down_bytes, mut terminated) = (0u64, 0u64, false);
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        let mut frames = Frames::default();
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) => return Ended::Client,
                Ok(n) => n,
                Err(_) => return Ended::ClientFailed,
            };
            let followed = frames.feed(
                &buf[..n],
                |tag| tracker.client_peek(tag),
                |tag, peeked| {
                    terminated |= tag == b'X';
                    tracker.client_message(tag, peeked);
                },
            );
            if followed.is_err() {
                return Ended::Refused(crate::errors::ErrorCode::BadRequest.as_str());
            }
            up_bytes += n as u64;
            if wire::send(&mut server_write, &buf[..n]).await.is_err() {
                return Ended::Server;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        let mut frames = Frames::default();
        tokio::pin!(stop);
        loop {
            let read = if frames.at_boundary() {
                tokio::select! {
                    biased;
                    (code, text) = &mut stop => {
                        let goodbye = wire::error_response("FATAL", "57P01", code, &text);
                        let _ = wire::send(&mut client_write, &goodbye).await;
                        return Ended::Stopped;
                    }
                    read = server_read.read(&mut buf) => read,
                }
            } else {
                server_read.read(&mut buf).await
            };
            let n = match read {
                Ok(0) | Err(_) => return Ended::Server,
                Ok(n) => n,
            };
            let followed = frames.feed(
                &buf[..n],
                |tag| tracker.server_peek(tag),
                |tag, peeked| tracker.server_message(tag, peeked),
            );
            if followed.is_err() {
                return Ended::Server;
            }
            for line in tracker.take_records().into_iter().flatten() {
                audit.record_line(line).await;
            }
            down_bytes += n as u64;
            // pingora's client stream buffers writes until flushed.
            if wire::send(&mut client_write, &buf[..n]).await.is_err() {
                return Ended::ClientFailed;
            }
        }
    };
    let ended = tokio::select! {
        ended = up => ended,
        ended = down => ended,
    };
    tally.request_bytes = up_bytes;
    tally.response_bytes = down_bytes;
    tally.goodbye = terminated;
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn boundaries_are_followed_across_any_split() {
        let mut stream = msg(b'D', &vec![7u8; 100_000]);
        stream.extend(msg(b'C', b"SELECT 12\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in [1, 2, 4, 5, 6, 4096, 99_999, 100_005] {
            let mut frames = Frames::default();
            let mut seen = Vec::new();
            for piece in stream.chunks(split) {
                frames
                    .feed(
                        piece,
                        |t| if t == b'C' { 64 } else { 0 },
                        |t, p| seen.push((t, p.to_vec())),
                    )
                    .unwrap();
            }
            assert!(frames.at_boundary());
            assert_eq!(
                seen,
                vec![
                    (b'D', vec![]),
                    (b'C', b"SELECT 12\0".to_vec()),
                    (b'Z', vec![])
                ],
                "split every {split}"
            );
        }
    }

    #[test]
    fn a_length_under_four_is_malformed_and_mid_message_is_no_boundary() {
        let mut frames = Frames::default();
        assert!(frames.feed(&[b'Q', 0, 0, 0, 3], |_| 0, |_, _| {}).is_err());
        let mut frames = Frames::default();
        frames
            .feed(&[b'Q', 0, 0, 0, 9, b's'], |_| 0, |_, _| {})
            .unwrap();
        assert!(!frames.at_boundary());
    }

    /// Whole messages and then any bytes at all, cut anywhere: the same
    /// messages are seen as when fed whole, with the same verdict, and
    /// no more of a body is kept than was asked for.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        type Seen = (Vec<(u8, Vec<u8>)>, bool);

        fn follow(stream: &[u8], cuts: &[usize]) -> Seen {
            let mut frames = Frames::default();
            let mut seen = Vec::new();
            let mut from = 0;
            for &cut in cuts.iter().chain([stream.len()].iter()) {
                let fed = frames.feed(
                    &stream[from..cut],
                    |tag| usize::from(tag % 8),
                    |tag, body| seen.push((tag, body.to_vec())),
                );
                if fed.is_err() {
                    return (seen, true);
                }
                from = cut;
            }
            (seen, false)
        }

        proptest! {
            #[test]
            fn messages_are_seen_the_same_however_the_stream_is_cut(
                messages in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..8),
                garbage in prop::collection::vec(any::<u8>(), 0..64),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let mut stream: Vec<u8> = messages.iter().flat_map(|(tag, body)| msg(*tag, body)).collect();
                stream.extend(&garbage);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                cuts.sort_unstable();
                let whole = follow(&stream, &[]);
                prop_assert_eq!(&follow(&stream, &cuts), &whole);
                for (i, (tag, body)) in messages.iter().enumerate() {
                    let wanted = &body[..body.len().min(usize::from(tag % 8))];
                    prop_assert_eq!(&whole.0[i], &(*tag, wanted.to_vec()));
                }
            }
        }
    }
}
