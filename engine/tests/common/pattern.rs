//! The test payload shared by engine/tests/processes.rs and the parallel-peer helper binary
//! (included by both with `#[path]`), so the sender and the checker cannot drift apart.

/// 64 KiB blocks, each a rotation of 0..251 (so shifted data never matches) stamped with its
/// block number (so swapped blocks never match).
pub fn pattern(n: usize) -> Vec<u8> {
    const BLOCK: usize = 64 << 10;
    let base: Vec<u8> = (0..BLOCK + 251).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::with_capacity(n);
    let mut b = 0usize;
    while out.len() < n {
        let len = BLOCK.min(n - out.len());
        let start = out.len();
        let rot = (b * 7) % 251;
        out.extend_from_slice(&base[rot..rot + len]);
        let stamp = (b as u64).to_le_bytes();
        let k = stamp.len().min(len);
        out[start..start + k].copy_from_slice(&stamp[..k]);
        b += 1;
    }
    out
}
