//! The request-response codec: a bincode [`Request`] one way and a [`Response`] the other,
//! each behind a little-endian `u32` length that is checked against [`MAX_MESSAGE_BYTES`] before a byte of
//! the body is allocated.

use std::io;
use std::sync::Arc;

use futures::prelude::*;
use libp2p::StreamProtocol;
use medmesh_protocol::messages::MAX_MESSAGE_BYTES;
use medmesh_protocol::{Request, Response};

use crate::metrics::Metrics;

/// An inbound request as read off a stream: a request, or why its frame was refused. A
/// refusal is reported to the event loop (which knows the peer, unlike the codec) rather
/// than failing the stream, so it is counted, logged with the sender's id and answered.
#[derive(Debug)]
pub enum Inbound {
    /// A well-formed request (boxed: requests are large, refusals small).
    Request(Box<Request>),
    /// A frame that broke the rules.
    Refused {
        /// Metrics label: `oversized` or `malformed`.
        reason: &'static str,
        /// What exactly was wrong.
        detail: String,
    },
}

/// Encodes and decodes requests and responses, counting the bytes it moves.
#[derive(Clone)]
pub struct FrameCodec {
    metrics: Arc<Metrics>,
}

impl FrameCodec {
    /// A codec that adds to `metrics`' byte counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    /// Reads one length-prefixed body, or says why its length is refused.
    async fn read_body<T: AsyncRead + Unpin + Send>(
        &self,
        io: &mut T,
    ) -> io::Result<Result<Vec<u8>, String>> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Ok(Err(format!(
                "message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        self.metrics.bytes_received.inc_by(4 + len as u64);
        Ok(Ok(body))
    }

    async fn read_request_frame<T: AsyncRead + Unpin + Send>(
        &self,
        io: &mut T,
    ) -> io::Result<Inbound> {
        Ok(match self.read_body(io).await? {
            Err(detail) => Inbound::Refused {
                reason: "oversized",
                detail,
            },
            Ok(body) => match Request::decode(&body) {
                Ok(request) => Inbound::Request(Box::new(request)),
                Err(e) => Inbound::Refused {
                    reason: "malformed",
                    detail: e.to_string(),
                },
            },
        })
    }

    /// Reads an answer; a bad one fails the request (the caller knows the peer).
    async fn read_answer<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Response> {
        let invalid = |reason: &'static str, detail: String| {
            self.metrics.rejected(reason);
            io::Error::new(io::ErrorKind::InvalidData, detail)
        };
        match self.read_body(io).await? {
            Err(detail) => Err(invalid("oversized", detail)),
            Ok(body) => Response::decode(&body).map_err(|e| invalid("malformed", e.to_string())),
        }
    }

    async fn write<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        body: Result<Vec<u8>, medmesh_protocol::messages::EncodeError>,
    ) -> io::Result<()> {
        let body = body.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // One buffer, one write: the length and a small body then share a Noise frame.
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        io.write_all(&frame).await?;
        self.metrics.bytes_sent.inc_by(frame.len() as u64);
        Ok(())
    }
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Inbound;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Inbound>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_request_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_answer(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Inbound::Request(request) => self.write(io, request.encode()).await,
            Inbound::Refused { detail, .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to send a refused frame: {detail}"),
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, res.encode()).await
    }
}
