//! A gRPC request body that refuses a message larger than the limit as
//! soon as its length prefix arrives, before the message is buffered.
//!
//! Every gRPC message on the wire is `[compressed: u8][length: u32 BE]`
//! followed by `length` bytes; this reads only those prefixes. A
//! compressed message is bounded by its compressed length here and by
//! tonic's decoder after decompression.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

const PREFIX_LEN: usize = 5;

pub struct FrameLimited<B> {
    inner: B,
    limit: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    message_left: usize,
}

impl<B> FrameLimited<B> {
    pub fn new(inner: B, limit: usize) -> Self {
        FrameLimited {
            inner,
            limit,
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            message_left: 0,
        }
    }

    /// Walks a chunk across message boundaries.
    fn scan(&mut self, mut chunk: &[u8]) -> Result<(), tonic::Status> {
        while !chunk.is_empty() {
            if self.message_left > 0 {
                let skip = self.message_left.min(chunk.len());
                self.message_left -= skip;
                chunk = &chunk[skip..];
                continue;
            }
            let take = (PREFIX_LEN - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&chunk[..take]);
            self.prefix_len += take;
            chunk = &chunk[take..];
            if self.prefix_len == PREFIX_LEN {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                let length = u32::from_be_bytes([a, b, c, d]) as usize;
                if length > self.limit {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "request message of {length} bytes is larger than the limit of {} bytes",
                        self.limit
                    )));
                }
                self.message_left = length;
            }
        }
        Ok(())
    }
}

impl<B> Body for FrameLimited<B>
where
    B: Body<Data = Bytes, Error = tonic::Status> + Unpin,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Err(status) = self.scan(data)
        {
            return Poll::Ready(Some(Err(status)));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len));
        bytes
    }

    fn limited(limit: usize) -> FrameLimited<()> {
        FrameLimited::new((), limit)
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_chunking() {
        let mut wire = message(10);
        wire.extend(message(3));
        for split in 0..wire.len() {
            let mut body = limited(10);
            let (a, b) = wire.split_at(split);
            assert!(
                body.scan(a).is_ok() && body.scan(b).is_ok(),
                "split at {split}"
            );
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_even_behind_a_small_one() {
        let mut wire = message(3);
        wire.extend(message(11));
        let mut body = limited(10);
        let (a, b) = wire.split_at(6);
        assert!(body.scan(a).is_ok());
        let status = body.scan(b).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }
}
