//! The session after login: bytes flow both ways as they arrive, through
//! one fixed buffer per direction. Packet boundaries are followed by
//! arithmetic on the 4-byte headers, a 16 MiB packet's continuation
//! included; only a command's first bytes and a response's first bytes are
//! looked at (`tracking`), so a 1 GiB row or `LOAD DATA` stream costs one
//! buffer. The server's `max_allowed_packet` is the server's to enforce.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::tracking::{ClientVerdict, ServerVerdict, Tracker};
use super::wire;
use crate::audit::AuditLog;
use crate::sessions::{Ended, Tally};

/// One read's worth.
const CHUNK: usize = 16 * 1024;

/// A packet's start, for deciding how much of it to look at.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub seq: u8,
    pub len: usize,
    /// It continues the previous packet (which was 16 MiB - 1 long).
    pub continuation: bool,
}

/// Follows the packet boundaries of one direction.
#[derive(Default)]
pub struct Packets {
    head: [u8; 4],
    have: usize,
    header: Option<Header>,
    /// Payload bytes of the current packet still to pass.
    remaining: usize,
    /// How much of the current payload to keep (decided on its first
    /// byte), and what was kept.
    peek: Option<usize>,
    peeked: Vec<u8>,
    /// The last packet was full: the next one continues it.
    full: bool,
}

/// What to do with a packet, decided on its first payload byte.
pub enum Want<R> {
    /// Look at this many bytes of it (0: none), then hand them over.
    Peek(usize),
    /// Do not pass it: stop the relay at its start.
    Stop(R),
}

impl Packets {
    pub fn at_boundary(&self) -> bool {
        self.header.is_none() && self.have == 0
    }

    /// Follows `data`. `want` is asked about each packet once its first
    /// payload byte is known (none for an empty packet); `seen` gets each
    /// packet with the bytes `want` asked for once they have passed. A
    /// `Stop` returns the offset in `data` where that packet starts (0 when
    /// it started in an earlier piece) with the reason.
    pub fn feed<R>(
        &mut self,
        data: &[u8],
        mut want: impl FnMut(Header, Option<u8>) -> Want<R>,
        mut seen: impl FnMut(Header, &[u8]),
    ) -> Result<(), (usize, R)> {
        let mut at = 0;
        let mut packet_start = 0;
        while at < data.len() {
            let Some(header) = self.header else {
                if self.have == 0 {
                    packet_start = at;
                }
                let take = (4 - self.have).min(data.len() - at);
                self.head[self.have..self.have + take].copy_from_slice(&data[at..at + take]);
                self.have += take;
                at += take;
                if self.have < 4 {
                    break;
                }
                self.have = 0;
                let len = usize::from(self.head[0])
                    | usize::from(self.head[1]) << 8
                    | usize::from(self.head[2]) << 16;
                let header = Header {
                    seq: self.head[3],
                    len,
                    continuation: self.full,
                };
                self.full = len == wire::MAX_PAYLOAD;
                self.header = Some(header);
                self.remaining = len;
                self.peek = None;
                self.peeked.clear();
                if len == 0 {
                    if let Want::Stop(why) = want(header, None) {
                        return Err((packet_start, why));
                    }
                    self.header = None;
                    seen(header, &[]);
                }
                continue;
            };
            let peek = match self.peek {
                Some(peek) => peek,
                None => match want(header, Some(data[at])) {
                    Want::Stop(why) => return Err((packet_start, why)),
                    Want::Peek(n) => *self.peek.insert(n.min(header.len)),
                },
            };
            let take = self.remaining.min(data.len() - at);
            if self.peeked.len() < peek {
                let room = (peek - self.peeked.len()).min(take);
                self.peeked.extend_from_slice(&data[at..at + room]);
            }
            self.remaining -= take;
            at += take;
            if self.remaining == 0 {
                self.header = None;
                seen(header, &self.peeked);
            }
        }
        Ok(())
    }
}

/// Relays until either side ends or `stop` resolves. `stop` is acted on
/// only where an ERR packet cannot land inside a response: between
/// commands, or before the first packet of a command's response.
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
    let (mut client_read, client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let client_write = tokio::sync::Mutex::new(client_write);
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        let mut packets = Packets::default();
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) => return Ended::Client,
                Ok(n) => n,
                Err(_) => return Ended::ClientFailed,
            };
            let followed = packets.feed(
                &buf[..n],
                |header, first| tracker.client_packet(header, first),
                |header, peeked| tracker.client_seen(header, peeked),
            );
            let (pass, refused) = match followed {
                Ok(()) => (n, None),
                Err((at, refusal)) => (at, Some(refusal)),
            };
            up_bytes += pass as u64;
            if pass > 0 && wire::send(&mut server_write, &buf[..pass]).await.is_err() {
                return Ended::Server;
            }
            if let Some(ClientVerdict { packet, code }) = refused {
                let _ = wire::send(&mut *client_write.lock().await, &packet).await;
                return Ended::Refused(code);
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        let mut packets = Packets::default();
        tokio::pin!(stop);
        loop {
            let read = if packets.at_boundary() && tracker.may_interrupt() {
                tokio::select! {
                    biased;
                    (code, text) = &mut stop => {
                        let goodbye = tracker.goodbye(code, &text);
                        let _ = wire::send(&mut *client_write.lock().await, &goodbye).await;
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
            let followed = packets.feed(
                &buf[..n],
                |header, first| tracker.server_packet(header, first),
                |header, peeked| tracker.server_seen(header, peeked),
            );
            for line in tracker.take_records().into_iter().flatten() {
                audit.record_line(line).await;
            }
            let (pass, refused) = match followed {
                Ok(()) => (n, None),
                Err((at, refusal)) => (at, Some(refusal)),
            };
            down_bytes += pass as u64;
            let mut to_client = client_write.lock().await;
            if pass > 0 && wire::send(&mut *to_client, &buf[..pass]).await.is_err() {
                return Ended::ClientFailed;
            }
            if let Some(ServerVerdict { packet }) = refused {
                let _ = wire::send(&mut *to_client, &packet).await;
                return Ended::ServerRefused;
            }
        }
    };
    let ended = tokio::select! {
        ended = up => ended,
        ended = down => ended,
    };
    tally.request_bytes = up_bytes;
    tally.response_bytes = down_bytes;
    tally.goodbye = tracker.quit();
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = payload;
        let mut seq = seq;
        // A payload of 16 MiB - 1 or more is split, ending with a shorter
        // (possibly empty) packet.
        loop {
            let take = rest.len().min(wire::MAX_PAYLOAD);
            out.extend_from_slice(&(take as u32).to_le_bytes()[..3]);
            out.push(seq);
            out.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            seq = seq.wrapping_add(1);
            if take < wire::MAX_PAYLOAD {
                return out;
            }
        }
    }

    #[test]
    fn boundaries_and_continuations_are_followed_across_any_split() {
        let big = vec![7u8; wire::MAX_PAYLOAD + 10];
        let mut stream = packet(0, b"\x03SELECT 1");
        stream.extend(packet(1, &big));
        stream.extend(packet(3, b""));
        for split in [1, 3, 4, 5, 4096, 1 << 20, wire::MAX_PAYLOAD + 3] {
            let mut packets = Packets::default();
            let mut seen = Vec::new();
            for piece in stream.chunks(split) {
                packets
                    .feed::<()>(
                        piece,
                        |h, first| {
                            Want::Peek(if first == Some(3) && !h.continuation {
                                64
                            } else {
                                1
                            })
                        },
                        |h, p| seen.push((h.seq, h.len, h.continuation, p.to_vec())),
                    )
                    .unwrap();
            }
            assert!(packets.at_boundary());
            assert_eq!(
                seen,
                vec![
                    (0, 9, false, b"\x03SELECT 1".to_vec()),
                    (1, wire::MAX_PAYLOAD, false, vec![7]),
                    (2, 10, true, vec![7]),
                    (3, 0, false, vec![]),
                ],
                "split every {split}"
            );
        }
    }

    #[test]
    fn a_stop_names_where_the_packet_began() {
        let mut stream = packet(0, b"\x0eping");
        stream.extend(packet(0, b"\x11change user"));
        let mut packets = Packets::default();
        let stopped = packets.feed(
            &stream,
            |_, first| match first {
                Some(0x11) => Want::Stop("refused"),
                _ => Want::Peek(0),
            },
            |_, _| {},
        );
        assert_eq!(stopped, Err((9, "refused")));
        assert!(!packets.at_boundary());
    }

    /// Whole packets and then any bytes at all, cut anywhere: the same
    /// packets are seen, and the stop comes at the same packet, as when
    /// fed whole.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        type Seen = (Vec<(u8, usize, bool, Vec<u8>)>, Option<usize>);

        /// The packets seen, and where it stopped: at a packet whose
        /// first byte is `stop`, if any; other packets are peeked into by
        /// their first byte.
        fn follow_stopping_at(stream: &[u8], cuts: &[usize], stop: Option<u8>) -> Seen {
            let mut packets = Packets::default();
            let mut seen = Vec::new();
            let mut from = 0;
            for &cut in cuts.iter().chain([stream.len()].iter()) {
                let fed = packets.feed(
                    &stream[from..cut],
                    |_, first| match first {
                        first if stop.is_some() && first == stop => Want::Stop(()),
                        first => Want::Peek(usize::from(first.unwrap_or(0) % 8)),
                    },
                    |h, p| seen.push((h.seq, h.len, h.continuation, p.to_vec())),
                );
                if let Err((at, ())) = fed {
                    return (seen, Some(from + at));
                }
                from = cut;
            }
            (seen, None)
        }

        fn follow(stream: &[u8], cuts: &[usize]) -> Seen {
            follow_stopping_at(stream, cuts, Some(0xff))
        }

        /// A session captured from the mariadb client against MariaDB
        /// (tests/corpus/README.md), each direction.
        const CAPTURED: [&[u8]; 2] = [
            include_bytes!("../../tests/corpus/mariadb.client"),
            include_bytes!("../../tests/corpus/mariadb.server"),
        ];

        proptest! {
            #[test]
            fn a_captured_session_is_seen_whole_and_alike_however_cut(
                side in 0usize..2,
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
            ) {
                let stream = CAPTURED[side];
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                cuts.sort_unstable();
                let whole = follow_stopping_at(stream, &[], None);
                prop_assert_eq!(whole.1, None);
                let lengths: usize = whole.0.iter().map(|p| 4 + p.1).sum();
                prop_assert_eq!(lengths, stream.len(), "every byte is in a packet");
                prop_assert_eq!(follow_stopping_at(stream, &cuts, None), whole);
            }

            #[test]
            fn packets_are_seen_the_same_however_the_stream_is_cut(
                payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8),
                garbage in prop::collection::vec(any::<u8>(), 0..64),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let mut stream: Vec<u8> = payloads
                    .iter()
                    .enumerate()
                    .flat_map(|(seq, p)| packet(seq as u8, p))
                    .collect();
                stream.extend(&garbage);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                cuts.sort_unstable();
                let ((cut_seen, cut_stop), (whole_seen, whole_stop)) =
                    (follow(&stream, &cuts), follow(&stream, &[]));
                prop_assert_eq!(cut_seen, whole_seen);
                match (cut_stop, whole_stop) {
                    (None, None) => {}
                    // The same packet: at its start, or at the start of the
                    // piece holding its first byte when its header came in
                    // an earlier one (already passed, as `feed` says).
                    (Some(cut), Some(whole)) => prop_assert!(whole <= cut && cut <= whole + 4),
                    stops => prop_assert!(false, "stops differ: {stops:?}"),
                }
            }
        }
    }
}
