//! Fuzzes the wire decoder, the one choke point for bytes from a peer (engine/src/wire/).
//!
//! Checks, for any input:
//! - WIRE-2: `decode_frame` returns a value or an error; it never panics, hangs or recurses.
//! - WIRE-1: nothing is allocated beyond the limits below (libFuzzer's -rss_limit_mb and
//!   -malloc_limit_mb catch a decoder that trusts a declared length).
//! - Round trip: a frame that decodes re-encodes, and the re-encoded frame decodes to the same
//!   value, so the encoder and the decoder agree on every value the decoder accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parallel_engine::wire::{Limits, decode_frame, encode_frame};

/// Small limits, so that an input can reach every one of them.
const LIMITS: Limits = Limits {
    max_descriptor: 64 << 10,
    max_payload: 1 << 20,
    max_segments: 64,
    max_depth: 16,
};

fuzz_target!(|data: &[u8]| {
    let Ok((header, value)) = decode_frame(data, &LIMITS) else {
        return;
    };
    // The encoder may refuse what the decoder accepted only on size: the archive it writes can
    // be laid out differently from the fuzzer's, and so be longer than max_descriptor.
    let frame = match encode_frame(header.kind, header.seq, &value, &LIMITS) {
        Ok(f) => f,
        Err(e) if e.to_string().contains("PARALLEL_MAX_DESCRIPTOR") => return,
        Err(e) => panic!("a decoded value does not re-encode: {e}"),
    };
    let (h2, back) = decode_frame(&frame, &LIMITS).expect("a re-encoded frame decodes");
    assert_eq!((h2.kind, h2.seq), (header.kind, header.seq));
    assert!(
        value.same(&back),
        "round trip changed {value:?} into {back:?}"
    );
});
