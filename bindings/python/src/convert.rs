//! Python values <-> engine values.
//!
//! Invariants:
//! - CONV-1: bool is tested before int (bool subclasses int in Python); ints outside 64 bits are
//!   refused with a clear error, never truncated.
//! - CONV-2: nesting is bounded by PARALLEL_MAX_VALUE_DEPTH, so a self-referencing list is an
//!   error, not a stack overflow.
//! - CONV-3: an object of any other type is refused with an error naming its type, unless this
//!   endpoint allows pickle (then it travels as a protocol-5 pickle).

use crate::dlpack;
use crate::errors::unsupported;
use parallel_engine::buffer::Buf;
use parallel_engine::value::{Key, Tensor, Value};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

static FACTORY: GILOnceCell<PyObject> = GILOnceCell::new();

/// Sets the callable that turns received tensors (DLPack holders) into user tensors.
pub fn set_tensor_factory(py: Python<'_>, f: PyObject) {
    let _ = FACTORY.set(py, f);
}

/// Python -> Value.
pub fn to_value(obj: &Bound<'_, PyAny>, allow_pickle: bool, depth: usize) -> PyResult<Value> {
    let max = parallel_engine::config::config().max_value_depth;
    if obj.is_none() {
        return Ok(Value::None);
    }
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        return obj.extract::<i64>().map(Value::Int).map_err(|_| {
            unsupported(format!(
                "int {} does not fit in 64 bits; send it as a str or bytes",
                obj.str().map(|s| s.to_string()).unwrap_or_default()
            ))
        });
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        return Ok(Value::Float(f.value()));
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(Value::Str(s.to_str()?.to_string()));
    }
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(Value::Bytes(Buf::from_vec(b.as_bytes().to_vec())));
    }
    let container = obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyTuple>()
        || obj.is_instance_of::<PyDict>();
    if container && depth >= max {
        return Err(unsupported(format!(
            "value nesting deeper than PARALLEL_MAX_VALUE_DEPTH ({max}); is a list or dict referencing itself?"
        )));
    }
    if let Ok(l) = obj.downcast::<PyList>() {
        return l
            .iter()
            .map(|x| to_value(&x, allow_pickle, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::List);
    }
    if let Ok(t) = obj.downcast::<PyTuple>() {
        return t
            .iter()
            .map(|x| to_value(&x, allow_pickle, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::Tuple);
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        let mut items = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            let key = if k.is_instance_of::<PyBool>() {
                return Err(unsupported(
                    "dict keys must be str or int (bool keys are ambiguous)",
                ));
            } else if let Ok(s) = k.downcast::<PyString>() {
                Key::Str(s.to_str()?.to_string())
            } else if k.is_instance_of::<PyInt>() {
                Key::Int(
                    k.extract::<i64>()
                        .map_err(|_| unsupported("dict key int does not fit in 64 bits"))?,
                )
            } else {
                return Err(unsupported(format!(
                    "dict keys must be str or int, not {}",
                    type_name(&k)
                )));
            };
            items.push((key, to_value(&v, allow_pickle, depth + 1)?));
        }
        return Ok(Value::Dict(items));
    }
    if obj.hasattr("__dlpack__")? {
        return dlpack::import(obj).map(Value::Tensor);
    }
    if obj.is_instance_of::<pyo3::types::PyByteArray>()
        || obj.is_instance_of::<pyo3::types::PyMemoryView>()
    {
        let b: Vec<u8> = obj
            .call_method0("__bytes__")
            .or_else(|_| PyBytes::type_object(obj.py()).call1((obj,)))?
            .extract()?;
        return Ok(Value::Bytes(Buf::from_vec(b)));
    }
    if allow_pickle {
        let pickle = obj.py().import("pickle")?;
        let data: Vec<u8> = pickle.call_method1("dumps", (obj, 5))?.extract()?;
        return Ok(Value::Pickle(Buf::from_vec(data)));
    }
    Err(unsupported(format!(
        "cannot send an object of type {}: supported are None, bool, int, float, str, bytes, list, tuple, dict and tensors; pass allow_pickle=True on both ends to pickle others",
        type_name(obj)
    )))
}

use pyo3::type_object::PyTypeInfo;

pub fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Value -> Python. `outs` are the objects given as `out`, in the order `Value::Out` indexes.
pub fn to_py(
    py: Python<'_>,
    v: Value,
    outs: &[PyObject],
    allow_pickle: bool,
) -> PyResult<PyObject> {
    Ok(match v {
        Value::None => py.None(),
        Value::Bool(b) => PyBool::new(py, b).to_owned().into_any().unbind(),
        Value::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Value::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::Str(s) => PyString::new(py, &s).into_any().unbind(),
        Value::Bytes(b) => PyBytes::new(py, &b).into_any().unbind(),
        Value::List(items) => {
            let v: Vec<PyObject> = items
                .into_iter()
                .map(|x| to_py(py, x, outs, allow_pickle))
                .collect::<PyResult<_>>()?;
            PyList::new(py, v)?.into_any().unbind()
        }
        Value::Tuple(items) => {
            let v: Vec<PyObject> = items
                .into_iter()
                .map(|x| to_py(py, x, outs, allow_pickle))
                .collect::<PyResult<_>>()?;
            PyTuple::new(py, v)?.into_any().unbind()
        }
        Value::Dict(items) => {
            let d = PyDict::new(py);
            for (k, x) in items {
                let key: PyObject = match k {
                    Key::Str(s) => PyString::new(py, &s).into_any().unbind(),
                    Key::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
                };
                d.set_item(key, to_py(py, x, outs, allow_pickle)?)?;
            }
            d.into_any().unbind()
        }
        Value::Tensor(t) => {
            let holder = Py::new(py, crate::Received::new(t))?;
            match FACTORY.get(py) {
                Some(f) => f.call1(py, (holder,))?,
                None => holder.into_any(),
            }
        }
        Value::Out(i) => outs
            .get(i)
            .map(|o| o.clone_ref(py))
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("out index out of range"))?,
        Value::Pickle(b) => {
            if !allow_pickle {
                return Err(unsupported(
                    "received a pickled object but this endpoint does not allow pickle (pass allow_pickle=True to accept it; the message was consumed)",
                ));
            }
            py.import("pickle")?
                .call_method1("loads", (PyBytes::new(py, &b),))?
                .unbind()
        }
    })
}

/// Flattens an `out=` argument (a tensor, or a list/tuple/dict of them, nested) into tensors, in
/// the order a sender's value of the same shape lists its tensors.
pub fn flatten_out(
    obj: &Bound<'_, PyAny>,
    tensors: &mut Vec<Tensor>,
    objs: &mut Vec<PyObject>,
    writebacks: &mut Vec<(PyObject, PyObject)>,
    depth: usize,
) -> PyResult<()> {
    if depth > 64 {
        return Err(unsupported("out= nests too deeply"));
    }
    if let Ok(l) = obj.downcast::<PyList>() {
        for x in l.iter() {
            flatten_out(&x, tensors, objs, writebacks, depth + 1)?;
        }
    } else if let Ok(t) = obj.downcast::<PyTuple>() {
        for x in t.iter() {
            flatten_out(&x, tensors, objs, writebacks, depth + 1)?;
        }
    } else if let Ok(d) = obj.downcast::<PyDict>() {
        for (_, v) in d.iter() {
            flatten_out(&v, tensors, objs, writebacks, depth + 1)?;
        }
    } else if obj.hasattr("__dlpack__")? {
        let (t, tmp) = dlpack::import_out(obj)?;
        tensors.push(t);
        objs.push(obj.clone().unbind());
        if let Some(tmp) = tmp {
            writebacks.push((obj.clone().unbind(), tmp));
        }
    } else {
        return Err(unsupported(format!(
            "out= must be a tensor or a list/tuple/dict of tensors, not {}",
            type_name(obj)
        )));
    }
    Ok(())
}

/// Copies contiguous stand-ins back into the non-contiguous CUDA views they replaced
/// (`dlpack::import_out`), once the engine filled them.
pub fn write_back(py: Python<'_>, writebacks: &[(PyObject, PyObject)]) -> PyResult<()> {
    for (view, tmp) in writebacks {
        view.call_method1(py, "copy_", (tmp.clone_ref(py),))?;
    }
    Ok(())
}
