//! The fixed 32-byte frame header and the limits every length from the wire is checked against
//! before anything is allocated (WIRE-1).

use crate::error::{Result, protocol};

pub const MAGIC: [u8; 4] = *b"PRL\x01";
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 32;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client's first frame (version, host identity, nonce, wishes).
    Hello = 1,
    /// Server's answer to Hello (its identity, nonce, proof, link offer).
    Welcome = 2,
    /// Client's proof of the shared secret.
    Auth = 3,
    /// Server accepted the client.
    Ready = 4,
    /// Server refused the client; the descriptor carries the reason.
    Refuse = 5,
    /// A user message.
    Message = 16,
    /// Orderly close: the sender will send nothing more.
    Close = 17,
    /// The sender abandoned what the two ends were doing (a collective whose rank died, say);
    /// the descriptor carries `{"reason": str}`, no segments; a Close follows.
    Abort = 18,
    /// A collective's control message (the tree's pass: `[control bytes, segments...]`, typed
    /// and validated by the collectives). Received only where a control message is expected
    /// ([`crate::link::Link::recv_control`]), never as a user message, and the reverse.
    Control = 19,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Auth,
            4 => FrameKind::Ready,
            5 => FrameKind::Refuse,
            16 => FrameKind::Message,
            17 => FrameKind::Close,
            18 => FrameKind::Abort,
            19 => FrameKind::Control,
            _ => return None,
        })
    }
}

/// Header flag: large segments of this message travel by cross-memory attach (shm links only).
pub const FLAG_CMA: u8 = 1;
/// Header flag: CUDA tensor segments of this message are CUDA IPC records (shm links only).
pub const FLAG_CUDA_IPC: u8 = 2;

/// Limits applied to everything decoded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_descriptor: u64,
    pub max_payload: u64,
    pub max_segments: usize,
    pub max_depth: usize,
}

impl Limits {
    pub fn from_config() -> Limits {
        let c = crate::config::config();
        Limits {
            max_descriptor: c.max_descriptor,
            max_payload: c.max_frame,
            max_segments: c.max_segments,
            max_depth: c.max_value_depth,
        }
    }
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub flags: u8,
    pub desc_len: u32,
    pub nseg: u32,
    pub payload_len: u64,
    pub seq: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = self.flags;
        b[8..12].copy_from_slice(&self.desc_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.nseg.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the limits (WIRE-1).
    pub fn decode(b: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header> {
        if b[0..4] != MAGIC {
            return Err(protocol(
                "decode",
                format!(
                    "bad magic {:02x?}: the peer is not speaking Parallel's protocol (a different program on this port?)",
                    &b[0..4]
                ),
            ));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(protocol(
                "decode",
                format!(
                    "the peer speaks wire version {version}, this build speaks {VERSION}: run the same torch_parallel version on both ends"
                ),
            ));
        }
        let kind = FrameKind::from_u8(b[6])
            .ok_or_else(|| protocol("decode", format!("unknown frame kind {}", b[6])))?;
        let h = Header {
            kind,
            flags: b[7],
            desc_len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            nseg: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            payload_len: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        };
        if h.flags & !(FLAG_CMA | FLAG_CUDA_IPC) != 0 {
            return Err(protocol(
                "decode",
                format!("unknown header flags {:#04x}", h.flags),
            ));
        }
        if u64::from(h.desc_len) > limits.max_descriptor {
            return Err(protocol(
                "decode",
                format!(
                    "descriptor of {} bytes exceeds PARALLEL_MAX_DESCRIPTOR ({})",
                    h.desc_len, limits.max_descriptor
                ),
            ));
        }
        if h.nseg as usize > limits.max_segments {
            return Err(protocol(
                "decode",
                format!(
                    "{} segments exceed PARALLEL_MAX_SEGMENTS ({})",
                    h.nseg, limits.max_segments
                ),
            ));
        }
        if h.payload_len > limits.max_payload {
            return Err(protocol(
                "decode",
                format!(
                    "payload of {} bytes exceeds PARALLEL_MAX_FRAME ({})",
                    h.payload_len, limits.max_payload
                ),
            ));
        }
        Ok(h)
    }
}
