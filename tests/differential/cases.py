"""Random programs and their NumPy reference, shared by the differential tests and their workers.

Every process derives the same program from a seed (so all ranks agree on the call sequence), and
any rank's inputs from (seed, case, rank): a rank builds its own inputs and, to check a result,
regenerates every contributing rank's inputs and reduces them with NumPy (float64 / complex128
for floats, the tensor's own dtype with wrap-around for integers).

Float inputs come in two modes. "exact": values whose sums and products are exact in every dtype
(multiples of 1/4 below 8, powers of two for products), so the result must equal the reference
bitwise whatever order the Tree reduces in. "random": normal values of mixed magnitude, checked
within a bound that covers any reduction order (p * eps * sum|x|); bitwise agreement across ranks
is checked separately from digests.

Behaviours of issue 10 that other branches are still building are switched by the flags below.
Each flag names the behaviour; the generator only produces the cases that exercise it when the flag
is on. The environment variable TP_DIFF_NEW=all (or a comma list of flag names) turns them on for
one run without editing this file.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from typing import Any

import numpy as np
import torch

# --- Behaviours not yet on main (issue 10). The lead switches each on once its branch is merged. ---
FLAGS: dict[str, bool] = {
    # 1. dict leaves matched by key: each rank builds its dicts in its own (shuffled) key order.
    "DICT_KEY_ORDER": True,
    # 1. plain int/float leaves are reduced (broadcast) and returned in the returned value.
    "PLAIN_NUMBERS": True,
    # 3. avg on integer/bool tensors raises on every rank instead of truncating.
    "AVG_INT_RAISES": True,
    # 4. done() ends a rank's part of an epoch; when all are done the next epoch starts with all ranks.
    "EPOCHS": True,
    # 4. all_gather / reduce_scatter while some ranks are done (see gathered_by_rank below).
    "UNEVEN_GATHER": True,
    # 4. broadcast / reduce whose root is done is an error on every calling rank.
    "ROOT_DONE_ERRORS": True,
    # 5. recv(out=) into a dict fills by key: the out dict is built in a shuffled key order.
    "RECV_OUT_BY_KEY": True,
    # 5. a recv(out=) whose out does not match is an error, the message is consumed, the link works.
    "OUT_MISMATCH_CONSUMED": True,
    # A value without leaves (an empty list) still runs the collective: contributors is set, and
    # done ranks count it as served. Main returns at once without communicating.
    "EMPTY_VALUE_COLLECTIVE": True,
    # done() returns the number of collectives served as the user called them. Main counts one per
    # dtype group of a nested value (and per internal pass), so a nested all_reduce counts 2-3 times.
    "SERVED_COUNTS_CALLS": True,
    # done(op=f): a done rank applies f only to collectives called with a Python function; built-in
    # ops keep their own reduction. On main it applies f to every collective it serves (a `min`
    # all_reduce comes out as f's result: silently wrong), so without this flag epochs with done
    # ranks use only built-in ops while ranks are done, and done() gets no op.
    "DONE_OP_ONLY_FOR_USER_CALLS": True,
}


def load_flags() -> dict[str, bool]:
    flags = dict(FLAGS)
    spec = os.environ.get("TP_DIFF_NEW", "")
    for name in filter(None, (s.strip() for s in spec.split(","))):
        if name == "all":
            flags = dict.fromkeys(flags, True)
        elif name.startswith("-") and name[1:] in flags:
            flags[name[1:]] = False
        elif name in flags:
            flags[name] = True
        else:
            raise ValueError(f"TP_DIFF_NEW: unknown flag {name!r}; known: {', '.join(flags)}")
    return flags


# --- dtypes ---------------------------------------------------------------------------------------
# name -> (torch dtype, numpy dtype of the values we generate and reduce, kind)
DTYPES: dict[str, tuple[torch.dtype, Any, str]] = {
    "bool": (torch.bool, np.bool_, "bool"),
    "uint8": (torch.uint8, np.uint8, "int"),
    "int8": (torch.int8, np.int8, "int"),
    "int16": (torch.int16, np.int16, "int"),
    "int32": (torch.int32, np.int32, "int"),
    "int64": (torch.int64, np.int64, "int"),
    "uint16": (torch.uint16, np.uint16, "int"),
    "uint32": (torch.uint32, np.uint32, "int"),
    "uint64": (torch.uint64, np.uint64, "int"),
    "float16": (torch.float16, np.float64, "float"),
    "bfloat16": (torch.bfloat16, np.float64, "float"),
    "float32": (torch.float32, np.float64, "float"),
    "float64": (torch.float64, np.float64, "float"),
    "complex64": (torch.complex64, np.complex128, "complex"),
    "complex128": (torch.complex128, np.complex128, "complex"),
}
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
EPS["complex64"], EPS["complex128"] = EPS["float32"], EPS["float64"]
# torch has no add for these (so no `a.add_(b)` callable on them)
NO_TORCH_ADD = {"uint16", "uint32", "uint64"}

BUILTIN_OPS = ["sum", "prod", "min", "max", "avg", "band", "bor", "bxor"]


def op_dtypes(op: str) -> list[str]:
    """The dtypes an op is defined for (docs/collectives.md, collectives/src/ops.rs::check)."""
    kinds = {k: v[2] for k, v in DTYPES.items()}
    if op == "sum":
        return list(DTYPES)
    if op in ("prod", "min", "max"):
        return [d for d in DTYPES if kinds[d] != "complex"]
    if op == "avg":
        return [d for d in DTYPES if kinds[d] in ("float", "complex")]
    if op in ("band", "bor", "bxor"):
        return [d for d in DTYPES if kinds[d] in ("int", "bool")]
    if op == "u_add" or op == "u_add_ret" or op == "u_add_none":
        return [d for d in DTYPES if d not in NO_TORCH_ADD]
    if op == "u_xor":
        return [d for d in DTYPES if kinds[d] in ("int", "bool")]
    if op == "u_max":
        return [d for d in DTYPES if kinds[d] != "complex"]
    raise AssertionError(op)


# --- Python reduce functions (all have zero as identity, the identity a done rank contributes) ---
def _u_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.add_(b)


def _u_add_ret(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def _u_add_none(a: torch.Tensor, b: torch.Tensor) -> None:
    a.add_(b)


def _u_xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.bitwise_xor_(b)


def _u_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.maximum(a, b)  # inputs are >= 0 for this one, so zero is its identity


CALLABLES = {
    "u_add": _u_add,
    "u_add_ret": _u_add_ret,
    "u_add_none": _u_add_none,
    "u_xor": _u_xor,
    "u_max": _u_max,
}
# what a callable computes, as a built-in op (for the reference)
CALLABLE_AS = {"u_add": "sum", "u_add_ret": "sum", "u_add_none": "sum", "u_xor": "bxor", "u_max": "max"}


def op_arg(op: str) -> Any:
    return CALLABLES.get(op, op)


# --- value specs ----------------------------------------------------------------------------------
# A spec is a tuple tree: ("t", dtype, shape, layout) | ("n", "int"|"float") | ("list", [specs])
# | ("tuple", [specs]) | ("dict", [(key, spec), ...]). Leaves are numbered in spec order.


def gen_shape(rng: random.Random, big: bool) -> tuple[int, ...]:
    r = rng.random()
    if big:
        n = rng.choice([65_537, 70_001, 100_003, 131_072])
        return (n,) if rng.random() < 0.5 else (n // 7, 7)
    if r < 0.08:
        return ()
    if r < 0.16:
        return rng.choice([(0,), (3, 0), (0, 5)])
    if r < 0.55:
        return (rng.randint(1, 40),)
    if r < 0.85:
        return (rng.randint(1, 12), rng.randint(1, 12))
    if r < 0.93:
        return (rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 6))
    return (rng.randint(300, 3000),)


def gen_layout(rng: random.Random, shape: tuple[int, ...]) -> str:
    if len(shape) == 0 or 0 in shape or rng.random() < 0.6:
        return "contig"
    if len(shape) == 2 and rng.random() < 0.4:
        return "transposed"
    return rng.choice(["strided", "offset"])


def gen_struct(
    rng: random.Random, dtypes: list[str], plain: list[str], depth: int = 0, big: bool = False
) -> tuple[Any, ...]:
    """A random nesting of tensors (and plain numbers of the kinds in `plain`)."""
    r = rng.random()
    if depth >= 3 or r < 0.45:
        if plain and rng.random() < 0.15:
            return ("n", rng.choice(plain))
        shape = gen_shape(rng, big and rng.random() < 0.5)
        return ("t", rng.choice(dtypes), shape, gen_layout(rng, shape))
    kind = rng.choice(["list", "tuple", "dict", "dict"])
    n = rng.randint(1, 4) if rng.random() < 0.95 else 0
    kids = [gen_struct(rng, dtypes, plain, depth + 1, big) for _ in range(n)]
    if kind == "dict":
        keys: list[Any] = []
        while len(keys) < n:
            k: Any = rng.choice(["w", "b", "bias", "layer1", "x", "é", "k" * rng.randint(1, 3)])
            if rng.random() < 0.2:
                k = rng.randint(-3, 50)
            if k not in keys:
                keys.append(k)
        return ("dict", list(zip(keys, kids, strict=True)))
    return (kind, kids)


def leaves(spec: tuple[Any, ...], path: str = "") -> list[tuple[str, tuple[Any, ...]]]:
    """(path, leaf spec) in spec order."""
    if spec[0] in ("t", "n"):
        return [(path, spec)]
    if spec[0] == "dict":
        return [x for k, s in spec[1] for x in leaves(s, f"{path}[{k!r}]")]
    return [x for i, s in enumerate(spec[1]) for x in leaves(s, f"{path}[{i}]")]


def has_leaf(spec: tuple[Any, ...], kind: str) -> bool:
    return any(s[0] == kind for _, s in leaves(spec))


# --- values ---------------------------------------------------------------------------------------
def leaf_array(
    seed: int, case: int, rank: int, idx: int, dtype: str, shape: tuple[int, ...], mode: str, op: str
) -> np.ndarray:
    """Rank `rank`'s values of leaf `idx`, as a NumPy array (float64/complex128 for floats, exactly
    representable in `dtype`)."""
    g = np.random.default_rng([seed, case, rank, idx])
    tdt, ndt, kind = DTYPES[dtype]
    n = int(np.prod(shape)) if shape else 1
    if kind == "bool":
        a = g.random(n) < (0.8 if op in ("prod", "min", "band") else 0.3)
    elif kind == "int":
        info = np.iinfo(ndt)
        if mode == "wide":  # wraps on overflow, as torch and NumPy do
            a = g.integers(info.min, info.max, n, dtype=ndt, endpoint=True)
        elif op == "prod":
            a = g.integers(max(info.min, -3), 4, n).astype(ndt)
        else:
            a = g.integers(max(info.min, -20), 21, n).astype(ndt)
        if op == "u_max":
            a = np.abs(a.astype(np.int64)).astype(ndt)
    else:
        a = _float_values(g, n, mode, op, dtype)
        if kind == "complex":
            a = a + 1j * _float_values(g, n, mode, op, dtype)
        else:
            a = a.astype(np.float64)
        a = representable(a, dtype)
    return np.asarray(a).reshape(shape)


def _float_values(g: np.random.Generator, n: int, mode: str, op: str, dtype: str) -> np.ndarray:
    if mode == "exact":
        if op == "prod":
            a = np.ldexp(1.0, g.integers(-2, 3, n)) * g.choice([-1.0, 1.0], n)
        else:
            a = g.integers(-32, 33, n) / 4.0
        if op in ("min", "max") and n and g.random() < 0.3:
            a[g.integers(0, n)] = g.choice([np.nan, np.inf, -np.inf])
    elif op == "prod":
        a = g.uniform(0.5, 2.0, n) * g.choice([-1.0, 1.0], n)
    else:
        a = g.standard_normal(n) * 10.0 ** g.integers(-2, 3, n)
    if op == "u_max":
        a = np.abs(a)
    return a


def representable(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` rounded to `dtype` and back (the values a tensor of that dtype really holds)."""
    tdt = DTYPES[dtype][0]
    wide = torch.complex128 if DTYPES[dtype][2] == "complex" else torch.float64
    return torch.from_numpy(np.array(a, order="C")).to(tdt).to(wide).numpy()


def plain_value(seed: int, case: int, rank: int, idx: int, kind: str, op: str) -> int | float:
    g = random.Random(hash_seed(seed, case, rank, idx))
    if kind == "int":
        return g.randint(-2, 3) if op == "prod" else g.randint(-1000, 1000)
    if op == "prod":
        return g.choice([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0])
    return g.randint(-400, 400) / 4.0


def hash_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def to_tensor(a: np.ndarray, dtype: str, layout: str) -> torch.Tensor:
    """A tensor of `dtype` holding `a`, in the given memory layout (a view where not contiguous)."""
    tdt = DTYPES[dtype][0]
    shape = a.shape
    if DTYPES[dtype][2] in ("float", "complex"):
        src = torch.from_numpy(np.array(a, order="C")).to(tdt)
    else:
        src = torch.from_numpy(np.array(a, order="C"))
    if layout == "contig":
        return src.clone()
    if layout == "transposed":
        base = torch.empty((shape[1], shape[0]), dtype=tdt)
        t = base.t()
    elif layout == "strided":
        base = torch.empty((shape[0] * 2, *shape[1:]), dtype=tdt)
        t = base[::2]
    else:  # offset: a contiguous view that does not start at its storage's beginning
        base = torch.empty(int(np.prod(shape)) + 3, dtype=tdt)
        t = base[3:].view(shape)
    t.copy_(src)
    return t


def tensor_array(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as NumPy (float64/complex128 for floats; raw dtype for integers)."""
    t = t.detach().cpu()
    if t.dtype.is_complex:
        return t.to(torch.complex128).numpy()
    if t.dtype.is_floating_point:
        return t.to(torch.float64).numpy()
    return t.numpy()


def build_value(
    spec: tuple[Any, ...], seed: int, case: int, rank: int, mode: str, op: str, order_seed: int | None
) -> Any:
    """Rank `rank`'s value for `spec`; dicts in a key order shuffled by `order_seed` when given."""
    counter = [0]
    shuffle = random.Random(order_seed) if order_seed is not None else None

    def go(s: tuple[Any, ...]) -> Any:
        if s[0] == "t":
            idx = counter[0]
            counter[0] += 1
            return to_tensor(leaf_array(seed, case, rank, idx, s[1], s[2], mode, op), s[1], s[3])
        if s[0] == "n":
            idx = counter[0]
            counter[0] += 1
            return plain_value(seed, case, rank, idx, s[1], op)
        if s[0] == "dict":
            items = [(k, go(v)) for k, v in s[1]]
            if shuffle is not None:
                shuffle.shuffle(items)
            return dict(items)
        kids = [go(v) for v in s[1]]
        return kids if s[0] == "list" else tuple(kids)

    return go(spec)


def leaf_inputs(spec: tuple[Any, ...], seed: int, case: int, rank: int, mode: str, op: str) -> list[Any]:
    """Rank `rank`'s leaves in spec order: arrays for tensors, numbers for plain numbers."""
    out: list[Any] = []
    for idx, (_, s) in enumerate(leaves(spec)):
        if s[0] == "t":
            out.append(leaf_array(seed, case, rank, idx, s[1], s[2], mode, op))
        else:
            out.append(plain_value(seed, case, rank, idx, s[1], op))
    return out


def get_path(value: Any, spec: tuple[Any, ...]) -> list[Any]:
    """The leaves of `value` in spec order (dicts looked up by key, whatever their order)."""
    if spec[0] in ("t", "n"):
        return [value]
    if spec[0] == "dict":
        if not isinstance(value, dict):
            raise AssertionError(f"expected a dict, got {type(value).__name__}")
        if set(value) != {k for k, _ in spec[1]}:
            raise AssertionError(
                f"dict keys {sorted(map(repr, value))} != {sorted(repr(k) for k, _ in spec[1])}"
            )
        return [x for k, s in spec[1] for x in get_path(value[k], s)]
    want = list if spec[0] == "list" else tuple
    if type(value) is not want or len(value) != len(spec[1]):
        raise AssertionError(f"expected a {want.__name__} of {len(spec[1])}, got {type(value).__name__}")
    return [x for v, s in zip(value, spec[1], strict=True) for x in get_path(v, s)]


# --- reference reductions -------------------------------------------------------------------------
def reduce_ref(op: str, dtype: str, xs: list[np.ndarray]) -> np.ndarray:
    """Reduces the contributing ranks' arrays (ints in their dtype, wrapping; floats in float64)."""
    op = CALLABLE_AS.get(op, op)
    kind = DTYPES[dtype][2]
    acc = np.array(xs[0], copy=True)
    with np.errstate(over="ignore", invalid="ignore"):
        for x in xs[1:]:
            if kind == "bool":
                f = {
                    "sum": np.logical_or,
                    "max": np.logical_or,
                    "bor": np.logical_or,
                    "prod": np.logical_and,
                    "min": np.logical_and,
                    "band": np.logical_and,
                    "bxor": np.logical_xor,
                }[op]
                acc = f(acc, x)
            elif op in ("sum", "avg"):
                acc = np.add(acc, x, dtype=acc.dtype)
            elif op == "prod":
                acc = np.multiply(acc, x, dtype=acc.dtype)
            elif op == "min":
                acc = np.minimum(acc, x)
            elif op == "max":
                acc = np.maximum(acc, x)
            elif op == "band":
                acc = np.bitwise_and(acc, x)
            elif op == "bor":
                acc = np.bitwise_or(acc, x)
            elif op == "bxor":
                acc = np.bitwise_xor(acc, x)
        if op == "avg":
            acc = acc / len(xs)
    return np.asarray(acc)


def reduce_plain(op: str, xs: list[Any]) -> Any:
    op = CALLABLE_AS.get(op, op)
    acc = xs[0]
    for x in xs[1:]:
        acc = {
            "sum": lambda a, b: a + b,
            "avg": lambda a, b: a + b,
            "prod": lambda a, b: a * b,
            "min": min,
            "max": max,
            # int numbers are reduced as int64 (docs/collectives.md), so the bitwise ops apply
            "band": lambda a, b: a & b,
            "bor": lambda a, b: a | b,
            "bxor": lambda a, b: a ^ b,
        }[op](acc, x)
    if op == "avg":
        acc = acc / len(xs)
    return acc


def check_tensor(
    got: Any, want: np.ndarray, dtype: str, shape: tuple[int, ...], op: str, mode: str, xs: list[np.ndarray]
) -> str | None:
    """None if `got` is the reduction `want` of `xs` (see the module doc for the float rule)."""
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor, got {type(got).__name__}"
    if got.dtype != DTYPES[dtype][0] or tuple(got.shape) != tuple(shape):
        return f"got {got.dtype} {tuple(got.shape)}, expected {DTYPES[dtype][0]} {tuple(shape)}"
    g = tensor_array(got)
    kind = DTYPES[dtype][2]
    base = CALLABLE_AS.get(op, op)
    if kind in ("int", "bool"):
        if np.array_equal(g, want.astype(g.dtype)):
            return None
        return _diff(g, want)
    exact = base in ("min", "max") or (mode == "exact" and base in ("sum", "prod"))
    w = representable(want, dtype) if exact else want
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    if exact:
        ok = (g == w) | (nan_g & nan_w)
    else:
        eps = EPS[dtype]
        p = len(xs)
        mag = np.sum([np.abs(x) for x in xs], axis=0) if base != "prod" else np.abs(w) * 1.0
        if base == "avg":
            mag = mag / p
        bound = (p + 1) * eps * mag + 2 * eps * np.abs(w) + 1e-300
        with np.errstate(invalid="ignore"):
            ok = (np.abs(g - w) <= bound) | (nan_g & nan_w) | ((g == w) & ~nan_w)
    if np.all(ok):
        return None
    return _diff(g, w)


def _diff(g: np.ndarray, w: np.ndarray) -> str:
    gf, wf = g.reshape(-1), np.asarray(w).reshape(-1)
    with np.errstate(invalid="ignore"):
        bad = (
            np.nonzero(~((gf == wf.astype(gf.dtype)) | (np.isnan(gf) & np.isnan(wf))))[0]
            if gf.dtype.kind in "fc"
            else np.nonzero(gf != wf.astype(gf.dtype))[0]
        )
    i = int(bad[0]) if len(bad) else 0
    return (
        f"{len(bad)} of {gf.size} elements differ; first at flat index {i}: got {gf[i]!r}, expected {wf[i]!r}"
    )


def digest(values: list[Any]) -> str:
    """A digest of results: tensors' dtype, shape and bytes; plain numbers' repr."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            t = v.detach().cpu()
            if t.dtype in (torch.float16, torch.bfloat16):
                t = t.view(torch.int16)
            h.update(np.ascontiguousarray(t.numpy()).tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def leaves_of(spec: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
    """Like `leaves`, for the endpoint specs (whose scalar leaves are 1-tuples)."""
    if spec[0] == "dict":
        return [x for k, s in spec[1] for x in leaves_of(s)]
    if spec[0] in ("list", "tuple"):
        return [x for s in spec[1] for x in leaves_of(s)]
    return [("", spec)]
