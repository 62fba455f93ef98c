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

/// An inbound request as read off a stream: a message, or why its frame was refused. A
/// refusal is reported to the event loop (which knows the peer, unlike the codec) rather
/// than failing the stream, so it is counted, logged with the sender's id and answered.
#[derive(Debug)]
pub enum Frame {
    /// A well-formed message (boxed: messages are large, refusals small).
    Message(Box<Message>),
    /// A frame that broke the rules.
    Refused {
        /// Metrics label: `oversized` or `malformed`.
        reason: &'static str,
        /// What exactly was wrong.
        detail: String,
    },
}

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

    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Frame> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Ok(Frame::Refused {
                reason: "oversized",
                detail: format!(
                    "message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
                ),
            });
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        self.metrics.bytes_received.add(4 + len as u64);
        Ok(match Message::decode(&body) {
            Ok(message) => Frame::Message(Box::new(message)),
            Err(e) => Frame::Refused {
                reason: "malformed",
                detail: e.to_string(),
            },
        })
    }

    /// Reads an answer; a bad one fails the request (the caller knows the peer).
    async fn read_answer<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Message> {
        match self.read(io).await? {
            Frame::Message(message) => Ok(*message),
            Frame::Refused { reason, detail } => {
                self.metrics.rejected(reason);
                Err(io::Error::new(io::ErrorKind::InvalidData, detail))
            }
        }
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
    type Request = Frame;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_answer(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Frame::Message(message) => self.write(io, &message).await,
            Frame::Refused { detail, .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to send a refused frame: {detail}"),
            )),
        }
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
