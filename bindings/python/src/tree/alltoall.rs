//! `Tree.all_to_all(tensors, outputs=None)`: one tensor per rank in, one per rank out, through
//! the collectives' pairwise all-to-all (`Tree::all_to_all_tensors`). CUDA tensors are staged
//! through host memory (the exchange moves host bytes) and come back on their device. Without
//! `outputs`, the shapes travel first (two small all-to-alls: the number of dimensions, then the
//! dimensions), so each rank allocates what it receives.

use super::ops::require_tensor;
use super::{Tree_, Work};
use crate::{convert, dlpack};
use parallel_engine::value::{DType, Tensor, Value};
use parallel_engine::{Error, ErrorKind};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

/// The most dimensions a received shape may claim (a bound on what a peer can make us allocate
/// for the shapes).
const MAX_DIMS: u64 = 64;

pub(super) fn is_cuda(o: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(o.hasattr("is_cuda")? && o.getattr("is_cuda")?.is_truthy()?)
}

fn count_error(what: &str, got: usize, n: usize) -> PyErr {
    PyValueError::new_err(format!(
        "all_to_all: {got} {what} for a world of {n}: pass one per rank (its own included), in \
         rank order"
    ))
}

pub(super) fn all_to_all<'py>(
    tree: &Tree_,
    py: Python<'py>,
    tensors: Vec<Bound<'py, PyAny>>,
    outputs: Option<Vec<Bound<'py, PyAny>>>,
) -> PyResult<Bound<'py, PyList>> {
    let (ins, device) = host_inputs(tree, &tensors)?;
    match outputs {
        Some(outs) => into_outputs(tree, py, ins, outs),
        None => new_outputs(tree, py, ins, device),
    }
}

/// `Tree.all_to_all_async(tensors, outputs)`: the same into given outputs, without waiting; the
/// handle's `wait` returns the list of outputs (CUDA ones filled from their host stand-ins).
pub(super) fn all_to_all_async<'py>(
    tree: &Tree_,
    py: Python<'py>,
    tensors: Vec<Bound<'py, PyAny>>,
    outputs: Vec<Bound<'py, PyAny>>,
) -> PyResult<Work> {
    let (ins, _) = host_inputs(tree, &tensors)?;
    let (mut recv, staged) = host_outputs(&outputs, ins.len())?;
    let writebacks = outputs
        .iter()
        .zip(&staged)
        .filter_map(|(o, h)| h.as_ref().map(|h| (o.clone().unbind(), h.clone().unbind())))
        .collect();
    let value = PyList::new(py, &outputs)?.into_any();
    tree.work(value, writebacks, move |t| {
        t.all_to_all_tensors(&ins, &mut recv).map(|_| ())
    })
}

/// The pieces to send as host tensors (CUDA ones copied to the host), and the device of the
/// first CUDA one.
fn host_inputs<'py>(
    tree: &Tree_,
    tensors: &[Bound<'py, PyAny>],
) -> PyResult<(Vec<Tensor>, Option<Bound<'py, PyAny>>)> {
    let n = tree.tree.world_size();
    if tensors.len() != n {
        return Err(count_error("tensors", tensors.len(), n));
    }
    let mut device: Option<Bound<'py, PyAny>> = None;
    let mut ins = Vec::with_capacity(n);
    for t in tensors {
        require_tensor(t, "all_to_all", false)?;
        let host = match is_cuda(t)? {
            true => {
                if device.is_none() {
                    device = Some(t.getattr("device")?);
                }
                t.call_method0("cpu")?
            }
            false => t.clone(),
        };
        ins.push(dlpack::import(&host)?);
    }
    Ok((ins, device))
}

/// The host stand-ins of CUDA outputs, by rank (None: received in place).
type Staged<'py> = Vec<Option<Bound<'py, PyAny>>>;

/// The outputs as host tensors to receive into, each CUDA one through a host stand-in (returned
/// alongside, to copy back).
fn host_outputs<'py>(outs: &[Bound<'py, PyAny>], n: usize) -> PyResult<(Vec<Tensor>, Staged<'py>)> {
    if outs.len() != n {
        return Err(count_error("outputs", outs.len(), n));
    }
    let mut staged = Vec::with_capacity(n);
    let mut recv = Vec::with_capacity(n);
    for o in outs {
        require_tensor(o, "all_to_all", false)?;
        let host = match is_cuda(o)? {
            true => Some(o.call_method0("cpu")?.call_method0("contiguous")?),
            false => None,
        };
        recv.push(dlpack::import_out(host.as_ref().unwrap_or(o))?.0);
        staged.push(host);
    }
    Ok((recv, staged))
}

/// Receives into the caller's tensors (staged through the host for CUDA ones).
fn into_outputs<'py>(
    tree: &Tree_,
    py: Python<'py>,
    ins: Vec<Tensor>,
    outs: Vec<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyList>> {
    let n = ins.len();
    let (mut recv, staged) = host_outputs(&outs, n)?;
    let took = tree.run(py, move |t| t.all_to_all_tensors(&ins, &mut recv))?;
    let result = PyList::new(py, (0..n).map(|_| py.None()))?;
    for r in took {
        if let Some(h) = &staged[r] {
            outs[r].call_method1("copy_", (h,))?;
        }
        result.set_item(r, &outs[r])?;
    }
    Ok(result)
}

/// Exchanges the shapes, then the data into new tensors (on `device` when the inputs were CUDA).
fn new_outputs<'py>(
    tree: &Tree_,
    py: Python<'py>,
    ins: Vec<Tensor>,
    device: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyList>> {
    let n = ins.len();
    // The three all-to-alls are one user call: a finished rank counts them once (TREE-4).
    let (took, outs) = tree.run(py, move |t| {
        t.with_structure(0, || {
            let ndims: Vec<Vec<u8>> = ins
                .iter()
                .map(|x| (x.shape().len() as u64).to_le_bytes().to_vec())
                .collect();
            let mut theirs = vec![vec![0u8; 8]; n];
            exchange(t, &ndims, &mut theirs)?;
            let dims: Vec<Vec<u8>> = ins
                .iter()
                .map(|x| {
                    x.shape()
                        .iter()
                        .flat_map(|d| (*d as u64).to_le_bytes())
                        .collect()
                })
                .collect();
            let mut shapes = Vec::with_capacity(n);
            for (s, b) in theirs.iter().enumerate() {
                let nd = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                if nd > MAX_DIMS {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "all_to_all",
                        format!(
                            "rank {s} announced a piece of {nd} dimensions (at most {MAX_DIMS})"
                        ),
                    ));
                }
                shapes.push(vec![0u8; 8 * nd as usize]);
            }
            exchange(t, &dims, &mut shapes)?;
            let dtype = ins.first().map_or(DType::U8, Tensor::dtype);
            let mut outs = shapes
                .iter()
                .map(|b| {
                    let shape: Vec<usize> = b
                        .chunks_exact(8)
                        .map(|d| u64::from_le_bytes(d.try_into().unwrap_or_default()) as usize)
                        .collect();
                    let bytes = shape
                        .iter()
                        .try_fold(dtype.itemsize(), |a, d| a.checked_mul(*d))
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Protocol,
                                "all_to_all",
                                format!("a received shape {shape:?} overflows"),
                            )
                        })?;
                    Tensor::from_bytes(dtype, shape, vec![0u8; bytes])
                })
                .collect::<parallel_engine::Result<Vec<Tensor>>>()?;
            let took = t.all_to_all_tensors(&ins, &mut outs)?;
            Ok((took, outs))
        })
    })?;
    let result = PyList::new(py, (0..n).map(|_| py.None()))?;
    let mut outs: Vec<Option<Tensor>> = outs.into_iter().map(Some).collect();
    for r in took {
        let Some(t) = outs[r].take() else { continue };
        let mut o = convert::to_py(py, Value::Tensor(t), &[], false)?;
        if let Some(d) = &device {
            o = o.call_method1(py, "to", (d,))?;
        }
        result.set_item(r, o)?;
    }
    Ok(result)
}

/// One all-to-all of u64 pieces (the shapes' round).
fn exchange(
    t: &parallel_collectives::Tree,
    sends: &[Vec<u8>],
    recvs: &mut [Vec<u8>],
) -> parallel_engine::Result<Vec<usize>> {
    let s: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
    let mut r: Vec<&mut [u8]> = recvs.iter_mut().map(|v| &mut v[..]).collect();
    t.all_to_all(DType::U64, &s, &mut r)
}
