//! The few PostgreSQL messages sealgate reads or writes itself, with every
//! length checked before it is trusted: a length only bounds how much is
//! read, never how much is allocated up front.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::framing::read_body;
pub use crate::framing::{send, ReadError};

/// PostgreSQL's own limit on a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// A password message carrying a caller token; tokens are far shorter.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Any one message sealgate reads whole from the upstream during login
/// (authentication requests, parameter statuses, notices).
pub const MAX_LOGIN_MESSAGE_LEN: usize = 64 * 1024;

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
pub const PROTOCOL_3: u32 = 3 << 16;

/// A startup-phase packet (no type byte): its code and the rest.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u32, Vec<u8>), ReadError> {
    let len = r.read_u32().await? as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ReadError::Length(len));
    }
    let code = r.read_u32().await?;
    Ok((code, read_body(r, len - 8).await?))
}

/// A typed message read whole, up to `max` bytes of body.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Vec<u8>), ReadError> {
    let tag = r.read_u8().await?;
    let len = r.read_u32().await? as usize;
    if len < 4 || len - 4 > max {
        return Err(ReadError::Length(len));
    }
    Ok((tag, read_body(r, len - 4).await?))
}

/// The parameters of a StartupMessage body: NUL-terminated name/value
/// pairs ended by an empty name.
pub fn startup_parameters(body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut fields = body.split(|&b| b == 0);
    let mut params = Vec::new();
    loop {
        let name = fields.next()?;
        if name.is_empty() {
            // The terminator must end the packet.
            return (fields.next() == Some(&[][..]) && fields.next().is_none()).then_some(params);
        }
        let value = fields.next()?;
        params.push((
            String::from_utf8(name.to_vec()).ok()?,
            String::from_utf8(value.to_vec()).ok()?,
        ));
    }
}

/// Appends one message: tag, length, then what `body` writes.
pub fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// An ErrorResponse sealgate makes itself (SPEC section 9): the message is
/// `sealgate: CODE: TEXT`.
pub fn error_response(severity: &str, sqlstate: &str, code: &str, text: &str) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, b'E', |b| {
        for (field, value) in [(b'S', severity), (b'V', severity), (b'C', sqlstate)] {
            b.put_u8(field);
            cstr(b, value);
        }
        b.put_u8(b'M');
        cstr(b, &format!("sealgate: {code}: {text}"));
        b.put_u8(0);
    });
    out
}

/// AuthenticationRequest `R` with the given code and no payload.
pub fn authentication(code: u32) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, b'R', |b| b.put_u32(code));
    out
}

pub fn backend_key_data(pid: u32, secret: u32) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
    out
}

/// NegotiateProtocolVersion: the newest minor version sealgate speaks and
/// the `_pq_.` options it does not support.
pub fn negotiate_protocol_version(unsupported: &[String]) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, b'v', |b| {
        b.put_u32(PROTOCOL_3);
        b.put_u32(unsupported.len() as u32);
        for name in unsupported {
            cstr(b, name);
        }
    });
    out
}

/// A field of an ErrorResponse or NoticeResponse body.
pub fn error_field(body: &[u8], wanted: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == wanted {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_need_their_terminator_and_nothing_after() {
        assert_eq!(
            startup_parameters(b"user\0app\0database\0orders\0\0"),
            Some(vec![
                ("user".into(), "app".into()),
                ("database".into(), "orders".into())
            ])
        );
        assert_eq!(startup_parameters(b"user\0app\0"), None);
        assert_eq!(startup_parameters(b"user\0app\0\0junk"), None);
        assert_eq!(startup_parameters(b"user\0"), None);
        assert_eq!(startup_parameters(b"\0"), Some(vec![]));
    }

    #[test]
    fn error_fields_are_found_and_a_truncated_body_is_not_read_past() {
        let e = error_response("FATAL", "28P01", "caller_unauthenticated", "no");
        let body = &e[5..];
        assert_eq!(error_field(body, b'C'), Some("28P01"));
        assert_eq!(
            error_field(body, b'M'),
            Some("sealgate: caller_unauthenticated: no")
        );
        assert_eq!(error_field(b"Cabc", b'C'), None);
        assert_eq!(error_field(b"", b'C'), None);
    }

    #[tokio::test]
    async fn lengths_are_checked_before_anything_is_read_or_allocated() {
        let mut huge = &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0][..];
        assert!(matches!(
            read_startup(&mut huge).await,
            Err(ReadError::Length(_))
        ));
        let mut short = &[0, 0, 0, 3][..];
        assert!(matches!(
            read_startup(&mut short).await,
            Err(ReadError::Length(3))
        ));
        let mut message = &[b'p', 0, 0, 0, 2][..];
        assert!(matches!(
            read_message(&mut message, 100).await,
            Err(ReadError::Length(2))
        ));
        // A length that promises more than arrives is a close, not a hang.
        let mut cut = &[b'p', 0, 0, 0, 20, b'a'][..];
        assert!(matches!(
            read_message(&mut cut, 100).await,
            Err(ReadError::Closed)
        ));
    }

    /// The fields sealgate reads from messages sent by either side, on
    /// any bytes: no panic, and a startup packet's parameters, when they
    /// parse, are exactly the pairs it was written from.
    mod properties {
        use super::*;
        use crate::framing::tests::block_on;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_body_is_read_without_panic(body in prop::collection::vec(any::<u8>(), 0..200), wanted in any::<u8>()) {
                let _ = startup_parameters(&body);
                let _ = error_field(&body, wanted);
            }

            /// A length field over the limit is refused before a byte of
            /// the body is read; under it, the body is what was sent, and a
            /// body cut short is a close.
            #[test]
            fn a_message_length_is_judged_before_the_body_is_read(
                tag in any::<u8>(),
                declared in any::<u32>(),
                max in 0usize..=MAX_LOGIN_MESSAGE_LEN,
                sent in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut bytes = vec![tag];
                bytes.extend_from_slice(&declared.to_be_bytes());
                bytes.extend_from_slice(&sent);
                let mut stream = &bytes[..];
                let read = block_on(read_message(&mut stream, max));
                let len = declared as usize;
                match read {
                    Err(ReadError::Length(l)) => {
                        prop_assert!(len < 4 || len - 4 > max);
                        prop_assert_eq!(l, len);
                        prop_assert_eq!(stream.len(), sent.len(), "no byte of the body was read");
                    }
                    Err(ReadError::Closed) => prop_assert!(sent.len() < len - 4),
                    Err(ReadError::Io) => prop_assert!(false, "a slice cannot fail"),
                    Ok((t, body)) => {
                        prop_assert_eq!(t, tag);
                        prop_assert_eq!(&body[..], &sent[..len - 4]);
                    }
                }
            }

            #[test]
            fn a_startup_length_is_judged_before_the_body_is_read(
                declared in any::<u32>(),
                code in any::<u32>(),
                sent in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut bytes = declared.to_be_bytes().to_vec();
                bytes.extend_from_slice(&code.to_be_bytes());
                bytes.extend_from_slice(&sent);
                let mut stream = &bytes[..];
                let read = block_on(read_startup(&mut stream));
                let len = declared as usize;
                match read {
                    Err(ReadError::Length(l)) => {
                        prop_assert!(!(8..=MAX_STARTUP_LEN).contains(&len));
                        prop_assert_eq!(l, len);
                        prop_assert_eq!(stream.len(), 4 + sent.len(), "no byte of the body was read");
                    }
                    Err(ReadError::Closed) => prop_assert!(sent.len() < len - 8),
                    Err(ReadError::Io) => prop_assert!(false, "a slice cannot fail"),
                    Ok((c, body)) => {
                        prop_assert_eq!(c, code);
                        prop_assert_eq!(&body[..], &sent[..len - 8]);
                    }
                }
            }

            /// psql's and pgbench's captured SSLRequest and startup
            /// (tests/corpus/README.md), cut anywhere, read as whole.
            #[test]
            fn captured_startups_are_read_whole_or_refused(cut in any::<prop::sample::Index>(), captured in 0usize..2) {
                let stream: &[u8] = [
                    &include_bytes!("../../tests/corpus/psql.client")[..],
                    &include_bytes!("../../tests/corpus/pgbench.client")[..],
                ][captured];
                let mut whole = stream;
                let ssl = block_on(read_startup(&mut whole));
                prop_assert!(matches!(ssl, Ok((SSL_REQUEST, ref body)) if body.is_empty()));
                let startup = block_on(read_startup(&mut whole));
                let Ok((PROTOCOL_3, body)) = startup else {
                    return Err(TestCaseError::fail("the startup was not read"));
                };
                let parameters = startup_parameters(&body).unwrap_or_default();
                prop_assert!(parameters.contains(&("user".into(), "postgres".into())), "{:?}", parameters);
                let mut cut_short = &stream[8..8 + cut.index(stream.len() - whole.len() - 8)];
                prop_assert!(matches!(block_on(read_startup(&mut cut_short)), Err(ReadError::Closed)));
            }

            #[test]
            fn startup_parameters_read_back_as_written(
                pairs in prop::collection::vec(("[a-z_]{1,12}", "[^\\x00]{0,16}"), 0..6),
            ) {
                let mut body = Vec::new();
                for (name, value) in &pairs {
                    body.extend_from_slice(name.as_bytes());
                    body.push(0);
                    body.extend_from_slice(value.as_bytes());
                    body.push(0);
                }
                body.push(0);
                prop_assert_eq!(startup_parameters(&body), Some(pairs));
            }
        }
    }
}
