//! MySQL packets sealgate reads or writes itself. The handshake's own
//! packets are parsed and built with `mysql_common`; this holds the
//! framing (a 3-byte length, a sequence id), the packets sealgate makes
//! (ERR, OK) and the few fields the relay reads. A length field only
//! bounds how much is read, never how much is allocated up front.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::framing::read_body;
pub use crate::framing::{send, ReadError};

/// A packet's payload is at most this long; a longer one continues in the
/// next packet.
pub const MAX_PAYLOAD: usize = 0xff_ffff;
/// Any handshake or authentication packet sealgate reads whole (greeting,
/// handshake response with its connection attributes, auth switch).
pub const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;

pub const OK: u8 = 0x00;
pub const ERR: u8 = 0xff;
/// An EOF packet (payload under 9 bytes), or an auth switch request.
pub const EOF: u8 = 0xfe;
/// A `LOAD DATA LOCAL` file request.
pub const LOCAL_INFILE: u8 = 0xfb;
/// Caching SHA-2 authentication's extra data.
pub const AUTH_MORE_DATA: u8 = 0x01;

/// A status flag of OK and EOF packets: another result set follows.
pub const MORE_RESULTS_EXIST: u16 = 0x0008;
/// A status flag: a cursor was opened, rows come with COM_STMT_FETCH.
pub const CURSOR_EXISTS: u16 = 0x0040;

/// One packet read whole: its sequence id and payload, up to `max` bytes.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Vec<u8>), ReadError> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len > max {
        return Err(ReadError::Length(len));
    }
    Ok((head[3], read_body(r, len).await?))
}

/// Appends one packet (payloads sealgate makes are far under 16 MiB).
pub fn packet(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    let len = payload.len().min(MAX_PAYLOAD) as u32;
    out.extend_from_slice(&len.to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(&payload[..len as usize]);
}

/// An ERR packet sealgate makes itself (SPEC section 10): the message is
/// `sealgate: CODE: TEXT`.
pub fn err_packet(seq: u8, number: u16, sqlstate: &str, code: &str, text: &str) -> Vec<u8> {
    let mut payload = vec![ERR];
    payload.extend_from_slice(&number.to_le_bytes());
    payload.push(b'#');
    payload.extend_from_slice(sqlstate.as_bytes());
    payload.extend_from_slice(format!("sealgate: {code}: {text}").as_bytes());
    let mut out = Vec::new();
    packet(&mut out, seq, &payload);
    out
}

/// A length-encoded integer at the start of `bytes`, and its size.
pub fn lenenc(bytes: &[u8]) -> Option<(u64, usize)> {
    let (&first, rest) = bytes.split_first()?;
    let size = match first {
        0..=0xfa => return Some((u64::from(first), 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let field = rest.get(..size)?;
    let value = field
        .iter()
        .rev()
        .fold(0u64, |acc, &b| acc << 8 | u64::from(b));
    Some((value, size + 1))
}

/// An OK packet's affected rows and status flags.
pub fn ok_fields(payload: &[u8]) -> Option<(u64, u16)> {
    let (rows, a) = lenenc(payload.get(1..)?)?;
    let (_, b) = lenenc(payload.get(1 + a..)?)?;
    let at = 1 + a + b;
    let status = payload.get(at..at + 2)?;
    Some((rows, u16::from_le_bytes([status[0], status[1]])))
}

/// An EOF packet's status flags.
pub fn eof_status(payload: &[u8]) -> u16 {
    payload
        .get(3..5)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// An ERR packet's error number and SQLSTATE (`HY000` when it has none).
pub fn err_fields(payload: &[u8]) -> Option<(u16, &str)> {
    let number = payload.get(1..3)?;
    let number = u16::from_le_bytes([number[0], number[1]]);
    let state = match payload.get(3..9) {
        Some([b'#', state @ ..]) => std::str::from_utf8(state).ok()?,
        _ => "HY000",
    };
    Some((number, state))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `packet` with up to four of its bytes changed, then cut anywhere.
    pub(crate) fn damaged(packet: Vec<u8>) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4);
        (0..=packet.len(), flips).prop_map(move |(keep, flips)| {
            let mut bytes = packet.clone();
            for (at, bits) in flips {
                let at = at.index(bytes.len());
                bytes[at] ^= bits;
            }
            bytes.truncate(keep);
            bytes
        })
    }

    /// (sequence id, payload) of each packet of a captured stream, read
    /// with `read_packet` as the fronts read them.
    pub(crate) fn packets(mut stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !stream.is_empty() {
            let read = crate::framing::tests::block_on(read_packet(&mut stream, MAX_PAYLOAD));
            out.push(read.expect("a captured stream is whole packets"));
        }
        out
    }

    #[tokio::test]
    async fn lengths_are_checked_before_anything_is_read_or_allocated() {
        let mut huge = &[0xff, 0xff, 0xff, 0, 1][..];
        assert!(matches!(
            read_packet(&mut huge, 100).await,
            Err(ReadError::Length(MAX_PAYLOAD))
        ));
        // A length that promises more than arrives is a close, not a hang.
        let mut cut = &[20, 0, 0, 1, b'a'][..];
        assert!(matches!(
            read_packet(&mut cut, 100).await,
            Err(ReadError::Closed)
        ));
        let mut whole = &[2, 0, 0, 7, b'h', b'i'][..];
        assert_eq!(
            read_packet(&mut whole, 100).await.unwrap(),
            (7, b"hi".to_vec())
        );
    }

    #[test]
    fn packet_fields_are_read_without_reading_past_the_end() {
        assert_eq!(lenenc(&[0xfa]), Some((250, 1)));
        assert_eq!(lenenc(&[0xfc, 0x10, 0x27]), Some((10_000, 3)));
        assert_eq!(lenenc(&[0xfd, 1, 0, 1]), Some((65_537, 4)));
        assert_eq!(
            lenenc(&[0xfe, 1, 0, 0, 0, 0, 0, 0, 1]),
            Some((1 << 56 | 1, 9))
        );
        assert_eq!(lenenc(&[0xfe, 1]), None);
        assert_eq!(lenenc(&[0xfb]), None);
        assert_eq!(
            ok_fields(&[0, 3, 0, 8, 0, 0, 0]),
            Some((3, MORE_RESULTS_EXIST))
        );
        assert_eq!(ok_fields(&[0, 0xfc, 1]), None);
        assert_eq!(eof_status(&[0xfe, 0, 0, 0x40, 0]), CURSOR_EXISTS);
        let err = err_packet(1, 1045, "28000", "caller_unauthenticated", "no");
        assert_eq!(err_fields(&err[4..]), Some((1045, "28000")));
        assert_eq!(
            &err[13..],
            b"sealgate: caller_unauthenticated: no".as_slice()
        );
        assert_eq!(err_fields(&[0xff, 0x10, 0x04, b'x']), Some((1040, "HY000")));
        assert_eq!(err_fields(&[0xff]), None);
    }

    /// The fields sealgate reads from server packets, on any bytes.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// A length field over the limit is refused before a byte of
            /// the payload is read; under it, the payload is what was sent,
            /// and a payload cut short is a close.
            #[test]
            fn a_packet_length_is_judged_before_the_payload_is_read(
                declared in 0usize..=MAX_PAYLOAD,
                seq in any::<u8>(),
                max in 0usize..=MAX_HANDSHAKE_PACKET,
                sent in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut bytes = (declared as u32).to_le_bytes()[..3].to_vec();
                bytes.push(seq);
                bytes.extend_from_slice(&sent);
                let mut stream = &bytes[..];
                let read = crate::framing::tests::block_on(read_packet(&mut stream, max));
                match read {
                    Err(ReadError::Length(l)) => {
                        prop_assert!(declared > max);
                        prop_assert_eq!(l, declared);
                        prop_assert_eq!(stream.len(), sent.len(), "no byte of the payload was read");
                    }
                    Err(ReadError::Closed) => prop_assert!(sent.len() < declared),
                    Err(ReadError::Io) => prop_assert!(false, "a slice cannot fail"),
                    Ok((s, payload)) => {
                        prop_assert_eq!(s, seq);
                        prop_assert_eq!(&payload[..], &sent[..declared]);
                    }
                }
            }

            #[test]
            fn any_payload_is_read_without_panic(payload in prop::collection::vec(any::<u8>(), 0..200)) {
                let _ = lenenc(&payload);
                let _ = ok_fields(&payload);
                let _ = eof_status(&payload);
                let _ = err_fields(&payload);
            }

            #[test]
            fn a_length_encoded_integer_reads_back(n in any::<u64>()) {
                let mut bytes = Vec::new();
                match n {
                    0..=250 => bytes.push(n as u8),
                    251..=0xffff => { bytes.push(0xfc); bytes.extend_from_slice(&(n as u16).to_le_bytes()); }
                    0x10000..=0xff_ffff => { bytes.push(0xfd); bytes.extend_from_slice(&(n as u32).to_le_bytes()[..3]); }
                    _ => { bytes.push(0xfe); bytes.extend_from_slice(&n.to_le_bytes()); }
                }
                prop_assert_eq!(lenenc(&bytes), Some((n, bytes.len())));
            }
        }
    }
}
