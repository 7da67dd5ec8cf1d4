//! The framing every Trellis stream uses (peering between controllers, the gateway and DNS
//! agent streams): a 4-byte big-endian length, then that many bytes of JSON.
//!
//! JSON because the states are small next to what the streams carry (a full sync of 10,000
//! services with 100,000 endpoints is ~15 MB and parses in tens of milliseconds), it is readable
//! in a packet capture or a log, and every crate already speaks serde. A length above the limit
//! fails before any of its body is buffered, so a peer cannot make the reader allocate it.
//!
//! [`FrameDecoder`] is sans IO: bytes in, values out; the callers own the sockets.

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The length prefix.
pub const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
    #[error("encoding a {label} frame")]
    Encode {
        label: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{label} message of {len} bytes exceeds the limit of {max} bytes")]
    EncodeTooLarge {
        label: &'static str,
        len: usize,
        max: usize,
    },
}

impl FrameError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Malformed(_) => "malformed_frame",
            FrameError::Encode { .. } | FrameError::EncodeTooLarge { .. } => "encode",
        }
    }
}

/// Encodes `value` as one frame; `label` names the message in errors.
pub fn encode_json_frame<T: Serialize>(
    value: &T,
    label: &'static str,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER];
    serde_json::to_writer(&mut out, value)
        .map_err(|source| FrameError::Encode { label, source })?;
    let len = out.len() - HEADER;
    let too_large = FrameError::EncodeTooLarge { label, len, max };
    if len > max {
        return Err(too_large);
    }
    let len32 = u32::try_from(len).map_err(|_| too_large)?;
    out[..HEADER].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Splits a byte stream into frames and decodes each.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Changes the largest frame accepted from here on (a stream whose first frame is small
    /// and later ones larger).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// How many bytes are buffered (for tests and metrics).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame decoded as `T`, if one is buffered. After an error the stream
    /// is unusable.
    pub fn next_json<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes(*header)).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let parsed = serde_json::from_slice(&self.buf[HEADER..HEADER + len]);
        self.buf.advance(HEADER + len);
        parsed.map(Some).map_err(FrameError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let mut stream = encode_json_frame(&"first", "test", 100).unwrap();
        stream.extend(encode_json_frame(&vec![1, 2, 3], "test", 100).unwrap());
        for cut in 0..stream.len() {
            let mut d = FrameDecoder::new(100);
            d.push(&stream[..cut]);
            let mut got: Vec<serde_json::Value> = Vec::new();
            while let Some(v) = d.next_json().unwrap() {
                got.push(v);
            }
            d.push(&stream[cut..]);
            while let Some(v) = d.next_json().unwrap() {
                got.push(v);
            }
            assert_eq!(
                got,
                vec![serde_json::json!("first"), serde_json::json!([1, 2, 3])]
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn a_length_over_the_limit_fails_before_the_body_arrives() {
        let mut d = FrameDecoder::new(100);
        d.push(&1000u32.to_be_bytes());
        let err = d.next_json::<serde_json::Value>().unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 1000,
                max: 100
            }
        ));
        assert_eq!(err.kind(), "frame_too_large");
    }

    #[test]
    fn bad_json_is_malformed_and_the_cause_is_kept_out_of_the_message() {
        let mut d = FrameDecoder::new(100);
        d.push(&3u32.to_be_bytes());
        d.push(b"{{{");
        let err = d.next_json::<serde_json::Value>().unwrap_err();
        assert_eq!(err.to_string(), "malformed frame");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn encoding_refuses_what_the_reader_would() {
        let err = encode_json_frame(&"x".repeat(200), "big", 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "big message of 202 bytes exceeds the limit of 100 bytes"
        );
    }
}
