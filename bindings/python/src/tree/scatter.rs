//! `Tree.reduce_scatter`, `Tree.reduce_scatter_in_place` and `Tree.all_gather_into`: by the
//! collectives' ring reduce-scatter and all-gather (`Tree::reduce_scatter`,
//! `Tree::all_gather_into`) where an all-reduce of the same bytes would take a ring, for
//! contiguous CPU tensors cut into equal parts along dimension 0 and built-in ops; otherwise the
//! all-reduce of the whole tensor, of which each rank keeps its part.

use super::Tree_;
use super::alltoall::is_cuda;
use super::ops::op_or_sum;
use crate::dlpack;
use parallel_engine::value::Tensor;
use parallel_engine::{Error, ErrorKind};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The bytes of a contiguous CPU tensor, writable (the callers checked that it is one).
fn host_bytes_mut<'a>(
    t: &'a mut Tensor,
    what: &'static str,
) -> parallel_engine::Result<&'a mut [u8]> {
    t.bytes_mut().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            what,
            "expected a contiguous CPU tensor (a bug: the caller checks)",
        )
    })
}

/// The ring's reduce-scatter of `tensor` in place, when it applies: a contiguous CPU tensor
/// whose dimension 0 cuts into `world_size` equal parts, of a size the all-reduce would take
/// by a ring, with a built-in op. This rank's part afterwards, or None (not applied).
pub(super) fn ring_reduce_scatter<'py>(
    tree: &Tree_,
    py: Python<'py>,
    tensor: &Bound<'py, PyAny>,
    op: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let (op, user, _) = op_or_sum(op)?;
    let n = tree.tree.world_size();
    let shape: Vec<usize> = tensor.getattr("shape")?.extract()?;
    if user.is_some()
        || is_cuda(tensor)?
        || !tensor.call_method0("is_contiguous")?.is_truthy()?
        || shape.first().is_none_or(|d0| d0 % n != 0)
    {
        return Ok(None);
    }
    let (mut t, _) = dlpack::import_out(tensor)?;
    if !tree.tree.ring_for(t.nbytes()) {
        return Ok(None);
    }
    let dtype = t.dtype();
    tree.run(py, move |tr| {
        let b = host_bytes_mut(&mut t, "reduce_scatter")?;
        tr.reduce_scatter(dtype, b, &op).map(|_| ())
    })?;
    let parts = tensor.call_method1("tensor_split", (n,))?;
    Ok(Some(parts.get_item(tree.tree.rank())?))
}

/// `Tree.all_gather_into(output, tensor)`.
pub(super) fn all_gather_into<'py>(
    tree: &Tree_,
    py: Python<'py>,
    output: Bound<'py, PyAny>,
    tensor: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let bad = |m: String| PyValueError::new_err(format!("all_gather_into: {m}"));
    if is_cuda(&output)? || is_cuda(tensor)? {
        return Err(bad(
            "takes CPU tensors (all_gather stages CUDA tensors through host memory)".into(),
        ));
    }
    if !output.call_method0("is_contiguous")?.is_truthy()? {
        return Err(bad(
            "the output must be contiguous (gather into a contiguous tensor, then copy)".into(),
        ));
    }
    let (mut out, _) = dlpack::import_out(&output)?;
    let inp = dlpack::import(tensor)?;
    let n = tree.tree.world_size();
    if inp.dtype() != out.dtype() {
        return Err(bad(format!(
            "the output is {}, the tensor {}: they must match",
            out.dtype().name(),
            inp.dtype().name()
        )));
    }
    let each = inp.nbytes();
    if out.nbytes() != each * n {
        return Err(bad(format!(
            "the output has {} bytes, expected world_size x the tensor's = {n} x {each}",
            out.nbytes()
        )));
    }
    // This rank's piece into its part (the tensor may lie anywhere in the output: FSDP passes
    // the part itself; a copy that overlaps is a memmove).
    let gathered;
    let piece: &[u8] = match inp.bytes() {
        Some(b) => b,
        None => {
            gathered = inp.contiguous_bytes().map_err(crate::errors::to_py)?;
            &gathered
        }
    };
    if each > 0 {
        // SAFETY: the output is a contiguous CPU tensor of n * each bytes (checked), so its part
        // at rank * each lies inside it; `piece` is `each` readable bytes; ptr::copy allows the
        // two to overlap.
        unsafe {
            std::ptr::copy(
                piece.as_ptr(),
                out.data_mut_ptr().add(tree.tree.rank() * each),
                each,
            )
        };
    }
    let dtype = out.dtype();
    tree.run(py, move |tr| {
        let b = host_bytes_mut(&mut out, "all_gather_into")?;
        tr.all_gather_into(dtype, b)
    })?;
    Ok(output)
}
