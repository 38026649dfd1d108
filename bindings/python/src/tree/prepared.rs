//! A nested value prepared for a collective (STRUCT-1..4), and the structure verdict that names
//! the first differing path when the ranks' structures differ (TREE-7).

use crate::convert;
use crate::structure::{self, Bare, Flat};
use parallel_collectives::Tree;
use parallel_collectives::fuse::Leaves;
use parallel_collectives::ops::Op;
use parallel_collectives::tree::STRUCTURE_DIFFERS;
use parallel_engine::value::{DType, Tensor};
use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;

/// A value prepared for a collective (STRUCT-1..4): flattened in canonical order, checked
/// against the op, with its structure's signature and hash.
pub(super) struct Prepared {
    pub(super) flat: Flat,
    pub(super) leaves: Leaves,
    pub(super) sig: Vec<u8>,
    pub(super) hash: u64,
}

impl Prepared {
    pub(super) fn new(
        value: &Bound<'_, PyAny>,
        what: &'static str,
        op: Option<&Op>,
    ) -> PyResult<Prepared> {
        // The common value, one plain torch CPU tensor, needs no flattening (the same
        // signature and checks as its flattened form).
        if let Some(bare) = Bare::of(value) {
            if let Some(op) = op {
                bare.check_op(op, what)?;
            }
            return Ok(Prepared::from_parts(
                Flat::default(),
                vec![bare.tensor],
                bare.signature,
                op,
            ));
        }
        let mut flat = Flat::collect(value, what)?;
        if let Some(op) = op {
            flat.check_op(op, what)?;
        }
        let sig = flat.signature();
        let tensors = flat.leaf_tensors();
        Ok(Prepared::from_parts(flat, tensors, sig, op))
    }

    fn from_parts(flat: Flat, tensors: Vec<Tensor>, sig: Vec<u8>, op: Option<&Op>) -> Prepared {
        // FNV-1a; never 0 (which means "no structure").
        let hash = sig
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            })
            .max(1);
        let empty = [DType::F32, DType::I64]
            .into_iter()
            .find(|d| op.is_none_or(|o| o.check(*d).is_ok()))
            .unwrap_or(DType::U8);
        Prepared {
            flat,
            leaves: Leaves::new(tensors, empty),
            sig,
            hash,
        }
    }

    /// Refuses number leaves (for the asynchronous collectives, which return the value itself).
    pub(super) fn no_numbers(&self, what: &'static str) -> PyResult<()> {
        if self.flat.has_numbers() {
            return Err(crate::errors::to_py(Error::new(
                ErrorKind::Unsupported,
                what,
                "plain numbers in the value: only the blocking call returns reduced numbers; pass tensors here",
            )));
        }
        Ok(())
    }

    /// After the collective: copies back, and the value to return (a copy carrying the reduced
    /// numbers when there are any, else `value` itself).
    pub(super) fn finish<'py>(
        mut self,
        value: Bound<'py, PyAny>,
        leaves: &Leaves,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = value.py();
        convert::write_back(py, &self.flat.writebacks)?;
        if !self.flat.has_numbers() {
            return Ok(value);
        }
        self.flat.numbers_from(leaves.tensors());
        Ok(self.flat.rebuild(&value)?.into_bound(py))
    }
}

/// Runs the collective(s) of one nested value carrying its structure hash (TREE-7); when the
/// ranks' structures differ, gathers them to name the first differing path and the ranks.
pub(super) fn structured(
    t: &Tree,
    what: &'static str,
    hash: u64,
    sig: &[u8],
    f: impl FnOnce() -> parallel_engine::Result<()>,
) -> parallel_engine::Result<()> {
    match t.with_structure(hash, f) {
        Err(e) if e.kind() == ErrorKind::Mismatch && e.message().contains(STRUCTURE_DIFFERS) => {
            let named = t.all_gather(sig).ok().and_then(|all| {
                // Every rank takes part in a structure verdict (TREE-7): sorted by rank,
                // the i-th piece is rank i's.
                let sigs: Vec<Vec<u8>> = all.into_iter().map(|(_, b)| b).collect();
                structure::first_difference(&sigs)
            });
            Err(match named {
                Some(m) => Error::new(
                    ErrorKind::Mismatch,
                    what,
                    format!("the values differ in structure across ranks: {m}"),
                ),
                None => e,
            })
        }
        r => r,
    }
}
