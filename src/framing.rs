//! What the database fronts' wire modules share: reading a length-prefixed
//! message without trusting its length (the length only bounds how much is
//! read; the buffer grows as bytes arrive) and writing through the
//! buffering of pingora's client streams.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a message could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io,
    /// The length field is impossible or over the caller's limit.
    Length(usize),
    /// The peer closed the connection before the message was whole.
    Closed,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Closed
        } else {
            ReadError::Io
        }
    }
}

/// Reads `len` bytes, growing the buffer only as bytes arrive.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let got = r.take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(ReadError::Closed);
    }
    Ok(body)
}

/// Writes and flushes: pingora's client stream buffers writes until
/// flushed.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
pub(crate) mod tests {
    /// Runs one of the readers above to its end, for the wire modules'
    /// tests.
    pub(crate) fn block_on<F: std::future::Future>(read: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(read)
    }
}
