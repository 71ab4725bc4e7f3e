//! Reading a known number of bytes into a buffer without zero-filling it first.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Appends exactly `length` bytes from `reader` to `buf`, reading into its spare
/// capacity (no zero-fill of memory the read overwrites anyway). An early end of the
/// stream is `UnexpectedEof`.
pub(crate) async fn read_exact_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    length: usize,
) -> std::io::Result<()> {
    let target = buf.len() + length;
    buf.reserve(length);
    while buf.len() < target {
        let remaining = (target - buf.len()) as u64;
        let read = (&mut *reader).take(remaining).read_buf(buf).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_exactly_length_and_reports_a_short_stream() {
        let source = vec![7u8; 10_000];
        let mut reader: &[u8] = &source;
        let mut buf = BytesMut::new();
        read_exact_into(&mut reader, &mut buf, 6000).await.unwrap();
        assert_eq!(buf.len(), 6000);
        assert_eq!(reader.len(), 4000, "nothing past length is consumed");
        let error = read_exact_into(&mut reader, &mut buf, 5000)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
