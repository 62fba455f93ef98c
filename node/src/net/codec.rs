//! The request-response codec: one bincode [`Message`] per stream direction, behind a
//! little-endian `u32` length that is checked against [`MAX_MESSAGE_BYTES`] before a byte of
//! the body is allocated.

use std::io;
use std::sync::Arc;

use futures::prelude::*;
use libp2p::StreamProtocol;
use medmesh_protocol::Message;
use medmesh_protocol::messages::MAX_MESSAGE_BYTES;

use crate::metrics::Metrics;

/// Encodes and decodes [`Message`]s, counting the bytes it moves.
#[derive(Clone)]
pub struct FrameCodec {
    metrics: Arc<Metrics>,
}

impl FrameCodec {
    /// A codec that adds to `metrics`' byte counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Message> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            self.metrics.rejected("oversized");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        self.metrics.bytes_received.add(4 + len as u64);
        Message::decode(&body).map_err(|e| {
            self.metrics.rejected("malformed");
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        })
    }

    async fn write<T: AsyncWrite + Unpin + Send>(&self, io: &mut T, m: &Message) -> io::Result<()> {
        let body = m
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // One buffer, one write: the length and a small body then share a Noise frame.
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        io.write_all(&frame).await?;
        self.metrics.bytes_sent.add(frame.len() as u64);
        Ok(())
    }
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, &res).await
    }
}
