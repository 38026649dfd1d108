//! Python values <-> engine values.
//!
//! Invariants:
//! - CONV-1: bool is tested before int (bool subclasses int in Python); ints outside 64 bits are
//!   refused with a clear error, never truncated.
//! - CONV-2: nesting is bounded by PARALLEL_MAX_VALUE_DEPTH, so a self-referencing list is an
//!   error, not a stack overflow.
//! - CONV-3: an object of any other type is refused with an error naming its type, unless this
//!   endpoint allows pickle (then it travels as a protocol-5 pickle).
//! - CONV-4: neither direction recurses on the value's depth (explicit stacks), so a value as
//!   deep as PARALLEL_MAX_VALUE_DEPTH allows converts on any thread's stack.

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

/// A Python container being converted (to_value's explicit stack, CONV-4).
enum OpenPy<'py> {
    Seq {
        todo: std::vec::IntoIter<Bound<'py, PyAny>>,
        done: Vec<Value>,
        tuple: bool,
    },
    Dict {
        todo: std::vec::IntoIter<(Key, Bound<'py, PyAny>)>,
        done: Vec<(Key, Value)>,
        key: Option<Key>,
    },
}

impl OpenPy<'_> {
    fn close(self) -> Value {
        match self {
            OpenPy::Seq { done, tuple, .. } if tuple => Value::Tuple(done),
            OpenPy::Seq { done, .. } => Value::List(done),
            OpenPy::Dict { done, .. } => Value::Dict(done),
        }
    }
}

/// One step of to_value: a finished value, or a container whose children come next.
enum Step<'py> {
    Leaf(Value),
    Open(OpenPy<'py>),
}

/// Python -> Value, without recursion (CONV-4): containers go on an explicit stack, so the depth
/// a value may have is PARALLEL_MAX_VALUE_DEPTH, whatever the thread's stack.
pub fn to_value(obj: &Bound<'_, PyAny>, allow_pickle: bool, depth: usize) -> PyResult<Value> {
    let max = parallel_engine::config::config().max_value_depth;
    let mut stack: Vec<OpenPy<'_>> = Vec::new();
    let mut step_now = step(obj, allow_pickle, depth, max)?;
    loop {
        // Descend into a new container, or hold a finished value to attach.
        let mut v = match step_now {
            Step::Open(o) => {
                stack.push(o);
                None
            }
            Step::Leaf(v) => Some(v),
        };
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(v.expect("the root was finished"));
            };
            if let Some(x) = v.take() {
                match top {
                    OpenPy::Seq { done, .. } => done.push(x),
                    OpenPy::Dict { done, key, .. } => {
                        done.push((key.take().expect("key set with its value"), x))
                    }
                }
            }
            let child = match top {
                OpenPy::Seq { todo, .. } => todo.next(),
                OpenPy::Dict { todo, key, .. } => todo.next().map(|(k, x)| {
                    *key = Some(k);
                    x
                }),
            };
            match child {
                Some(x) => {
                    step_now = step(&x, allow_pickle, depth + stack.len(), max)?;
                    break;
                }
                None => {
                    let done = stack.pop().expect("non-empty").close();
                    if stack.is_empty() {
                        return Ok(done);
                    }
                    v = Some(done);
                }
            }
        }
    }
}

/// Converts a non-container, or opens a container (its children listed, not yet converted).
fn step<'py>(
    obj: &Bound<'py, PyAny>,
    allow_pickle: bool,
    depth: usize,
    max: usize,
) -> PyResult<Step<'py>> {
    let container = obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyTuple>()
        || obj.is_instance_of::<PyDict>();
    if !container {
        return leaf_value(obj, allow_pickle).map(Step::Leaf);
    }
    if depth >= max {
        return Err(unsupported(format!(
            "value nesting deeper than PARALLEL_MAX_VALUE_DEPTH ({max}); is a list or dict referencing itself?"
        )));
    }
    if let Ok(l) = obj.downcast::<PyList>() {
        return Ok(Step::Open(OpenPy::Seq {
            todo: l.iter().collect::<Vec<_>>().into_iter(),
            done: Vec::with_capacity(l.len()),
            tuple: false,
        }));
    }
    if let Ok(t) = obj.downcast::<PyTuple>() {
        return Ok(Step::Open(OpenPy::Seq {
            todo: t.iter().collect::<Vec<_>>().into_iter(),
            done: Vec::with_capacity(t.len()),
            tuple: true,
        }));
    }
    let d = obj.downcast::<PyDict>()?;
    let mut todo = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        todo.push((dict_key(&k)?, v));
    }
    Ok(Step::Open(OpenPy::Dict {
        done: Vec::with_capacity(todo.len()),
        todo: todo.into_iter(),
        key: None,
    }))
}

/// A dict key: str or int (not bool).
pub fn dict_key(k: &Bound<'_, PyAny>) -> PyResult<Key> {
    if k.is_instance_of::<PyBool>() {
        Err(unsupported(
            "dict keys must be str or int (bool keys are ambiguous)",
        ))
    } else if let Ok(s) = k.downcast::<PyString>() {
        Ok(Key::Str(s.to_str()?.to_string()))
    } else if k.is_instance_of::<PyInt>() {
        Ok(Key::Int(k.extract::<i64>().map_err(|_| {
            unsupported("dict key int does not fit in 64 bits")
        })?))
    } else {
        Err(unsupported(format!(
            "dict keys must be str or int, not {}",
            type_name(k)
        )))
    }
}

/// Python -> Value for everything but lists, tuples and dicts.
fn leaf_value(obj: &Bound<'_, PyAny>, allow_pickle: bool) -> PyResult<Value> {
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

/// A received container being converted (to_py's explicit stack, CONV-4).
enum OpenVal {
    Seq {
        todo: std::vec::IntoIter<Value>,
        done: Vec<PyObject>,
        tuple: bool,
    },
    Dict {
        todo: std::vec::IntoIter<(Key, Value)>,
        done: Vec<(PyObject, PyObject)>,
        key: Option<PyObject>,
    },
}

/// Value -> Python, without recursion (CONV-4). `outs` are the objects given as `out`, in the
/// order `Value::Out` indexes.
pub fn to_py(
    py: Python<'_>,
    v: Value,
    outs: &[PyObject],
    allow_pickle: bool,
) -> PyResult<PyObject> {
    let mut stack: Vec<OpenVal> = Vec::new();
    let mut cur = v;
    loop {
        let mut obj = match open_val(py, cur, outs, allow_pickle)? {
            Ok(o) => Some(o),
            Err(open) => {
                stack.push(open);
                None
            }
        };
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(obj.expect("the root was converted"));
            };
            if let Some(o) = obj.take() {
                match top {
                    OpenVal::Seq { done, .. } => done.push(o),
                    OpenVal::Dict { done, key, .. } => {
                        done.push((key.take().expect("key set with its value"), o))
                    }
                }
            }
            let child = match top {
                OpenVal::Seq { todo, .. } => todo.next(),
                OpenVal::Dict { todo, key, .. } => match todo.next() {
                    Some((k, x)) => {
                        *key = Some(match k {
                            Key::Str(s) => PyString::new(py, &s).into_any().unbind(),
                            Key::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
                        });
                        Some(x)
                    }
                    None => None,
                },
            };
            match child {
                Some(x) => {
                    cur = x;
                    break;
                }
                None => {
                    let done = match stack.pop().expect("non-empty") {
                        OpenVal::Seq { done, tuple, .. } if tuple => {
                            PyTuple::new(py, done)?.into_any().unbind()
                        }
                        OpenVal::Seq { done, .. } => PyList::new(py, done)?.into_any().unbind(),
                        OpenVal::Dict { done, .. } => {
                            let d = PyDict::new(py);
                            for (k, x) in done {
                                d.set_item(k, x)?;
                            }
                            d.into_any().unbind()
                        }
                    };
                    if stack.is_empty() {
                        return Ok(done);
                    }
                    obj = Some(done);
                }
            }
        }
    }
}

/// Converts a non-container value, or opens a container for to_py's stack.
fn open_val(
    py: Python<'_>,
    mut v: Value,
    outs: &[PyObject],
    allow_pickle: bool,
) -> PyResult<Result<PyObject, OpenVal>> {
    let tuple = matches!(v, Value::Tuple(_));
    Ok(Ok(match &mut v {
        Value::None => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Value::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::Str(s) => PyString::new(py, s).into_any().unbind(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
        Value::List(items) | Value::Tuple(items) => {
            let items = std::mem::take(items);
            return Ok(Err(OpenVal::Seq {
                done: Vec::with_capacity(items.len()),
                todo: items.into_iter(),
                tuple,
            }));
        }
        Value::Dict(items) => {
            let items = std::mem::take(items);
            return Ok(Err(OpenVal::Dict {
                done: Vec::with_capacity(items.len()),
                todo: items.into_iter(),
                key: None,
            }));
        }
        Value::Tensor(_) => {
            let t = v.into_tensor().map_err(|_| {
                pyo3::exceptions::PyRuntimeError::new_err("tensor value without a tensor")
            })?;
            let holder = Py::new(py, crate::Received::new(t))?;
            match FACTORY.get(py) {
                Some(f) => f.call1(py, (holder,))?,
                None => holder.into_any(),
            }
        }
        Value::Out(i) => outs
            .get(*i)
            .map(|o| o.clone_ref(py))
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("out index out of range"))?,
        Value::Pickle(b) => {
            if !allow_pickle {
                return Err(unsupported(
                    "received a pickled object but this endpoint does not allow pickle (pass allow_pickle=True to accept it; the message was consumed)",
                ));
            }
            py.import("pickle")?
                .call_method1("loads", (PyBytes::new(py, b),))?
                .unbind()
        }
    }))
}

/// The tensors of an `out=` argument (a tensor, or a list/tuple/dict of them, nested).
#[derive(Default)]
pub struct Outs {
    pub tensors: Vec<Tensor>,
    pub objs: Vec<PyObject>,
    pub writebacks: Vec<(PyObject, PyObject)>,
    /// Each tensor's path (indices and dict keys), for a container `out=`: the message's tensors
    /// are matched to them by path. None for a bare tensor, which takes the message's only one.
    pub paths: Option<Vec<Vec<Key>>>,
}

impl Outs {
    pub fn collect(obj: &Bound<'_, PyAny>) -> PyResult<Outs> {
        let mut o = Outs::default();
        let mut paths = Vec::new();
        flatten_out(obj, &mut o, &mut Vec::new(), &mut paths)?;
        if !obj.hasattr("__dlpack__")? {
            o.paths = Some(paths);
        }
        Ok(o)
    }
}

/// Flattens an `out=` argument into tensors and their paths.
fn flatten_out(
    obj: &Bound<'_, PyAny>,
    o: &mut Outs,
    path: &mut Vec<Key>,
    paths: &mut Vec<Vec<Key>>,
) -> PyResult<()> {
    if path.len() > 64 {
        return Err(unsupported("out= nests too deeply"));
    }
    let mut each = |o: &mut Outs, path: &mut Vec<Key>, k: Key, x: &Bound<'_, PyAny>| {
        path.push(k);
        let r = flatten_out(x, o, path, paths);
        path.pop();
        r
    };
    if let Ok(l) = obj.downcast::<PyList>() {
        for (i, x) in l.iter().enumerate() {
            each(o, path, Key::Int(i as i64), &x)?;
        }
    } else if let Ok(t) = obj.downcast::<PyTuple>() {
        for (i, x) in t.iter().enumerate() {
            each(o, path, Key::Int(i as i64), &x)?;
        }
    } else if let Ok(d) = obj.downcast::<PyDict>() {
        for (k, v) in d.iter() {
            each(o, path, dict_key(&k)?, &v)?;
        }
    } else if obj.hasattr("__dlpack__")? {
        let (t, tmp) = dlpack::import_out(obj)?;
        o.tensors.push(t);
        o.objs.push(obj.clone().unbind());
        paths.push(path.clone());
        if let Some(tmp) = tmp {
            o.writebacks.push((obj.clone().unbind(), tmp));
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
