"""Client/Server round trips of random nested values, with and without `out=`.

Both ends derive the message sequence from the seed: the server (a separate process, `echo_main`)
receives each message (into preallocated tensors when the case says so), checks it against the
value it regenerates, and sends back what it received; the client (`client_loop`, in the test
process) sends each value and checks the echo, again with or without `out=` and sometimes with
the asynchronous calls. Values: None, bool, 64-bit ints (extremes included), floats (nan, inf,
-0.0), unicode str, bytes, lists, tuples, dicts with str/int keys, torch tensors of every dtype
(0-d, empty, strided/transposed/offset views, up to 5 MB) and NumPy arrays.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases as C  # noqa: E402

import torch_parallel as parallel  # noqa: E402

SCALARS = ["none", "bool", "int", "float", "str", "bytes"]


def gen_spec(rng: random.Random, tensors_only: bool, depth: int = 0) -> tuple[Any, ...]:
    if depth >= 4 or rng.random() < 0.45:
        if not tensors_only and rng.random() < 0.4:
            return (rng.choice(SCALARS),)
        big = rng.random() < 0.03
        shape = C.gen_shape(rng, False) if not big else (rng.choice([1_250_003, 600_001]),)
        dt = rng.choice(list(C.DTYPES))
        if not tensors_only and rng.random() < 0.1 and dt not in ("bfloat16",):
            return ("np", dt, shape)
        return ("t", dt, shape, C.gen_layout(rng, shape))
    kind = rng.choice(["list", "tuple", "dict", "dict"])
    n = rng.randint(1, 4) if rng.random() < 0.93 else 0
    kids = [gen_spec(rng, tensors_only, depth + 1) for _ in range(n)]
    if kind == "dict":
        keys: list[Any] = []
        while len(keys) < n:
            k: Any = rng.choice(["a", "b", "w", "weight", "ключ", "", "x" * rng.randint(1, 40)])
            if rng.random() < 0.3:
                k = rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randint(-99, 99)])
            if k not in keys:
                keys.append(k)
        return ("dict", list(zip(keys, kids, strict=True)))
    return (kind, kids)


def program(seed: int, n: int, flags: dict[str, bool]) -> list[dict[str, Any]]:
    rng = random.Random(C.hash_seed("endpoint", seed))
    out = []
    for i in range(n):
        m: dict[str, Any] = {"id": i, "async": rng.random() < 0.2}
        m["out_client"] = rng.random() < 0.35
        m["out_server"] = rng.random() < 0.35
        m["spec"] = gen_spec(rng, m["out_client"] or m["out_server"])
        if m["out_client"] or m["out_server"]:
            while not any(s[0] == "t" for _, s in C.leaves_of(m["spec"])):
                m["spec"] = gen_spec(rng, True)
        m["mismatch"] = flags["OUT_MISMATCH_CONSUMED"] and m["out_client"] and rng.random() < 0.15
        out.append(m)
    return out


def build(spec: tuple[Any, ...], seed: int, case: int) -> Any:
    counter = [0]

    def go(s: tuple[Any, ...]) -> Any:
        if s[0] in ("list", "tuple"):
            kids = [go(v) for v in s[1]]
            return kids if s[0] == "list" else tuple(kids)
        if s[0] == "dict":
            return {k: go(v) for k, v in s[1]}
        idx = counter[0]
        counter[0] += 1
        g = random.Random(C.hash_seed(seed, case, idx))
        if s[0] == "t":
            return C.to_tensor(C.leaf_array(seed, case, 0, idx, s[1], s[2], "wide", ""), s[1], s[3])
        if s[0] == "np":
            a = C.leaf_array(seed, case, 0, idx, s[1], s[2], "wide", "")
            return np.array(C.to_tensor(a, s[1], "contig").numpy())
        return scalar(s[0], g)

    return go(spec)


def scalar(kind: str, g: random.Random) -> Any:
    if kind == "none":
        return None
    if kind == "bool":
        return g.random() < 0.5
    if kind == "int":
        return g.choice([0, 1, -1, 2**63 - 1, -(2**63), g.randint(-(2**63), 2**63 - 1), g.randint(-9, 9)])
    if kind == "float":
        return g.choice(
            [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308, g.uniform(-1e6, 1e6)]
        )
    if kind == "str":
        return "".join(g.choice("aZ09 \n\t\0é€😀ß") for _ in range(g.choice([0, 1, 7, 300])))
    return bytes(g.getrandbits(8) for _ in range(g.choice([0, 1, 33, 5000])))


def empty_like_out(spec: tuple[Any, ...], order_seed: int | None, mismatch: bool, rng: random.Random) -> Any:
    """Preallocated tensors for `out=` of a tensors-only spec (dicts in a shuffled key order when
    `order_seed` is given); `mismatch`: one tensor gets a wrong shape."""
    shuffle = random.Random(order_seed) if order_seed is not None else None
    bad = [mismatch]

    def go(s: tuple[Any, ...]) -> Any:
        if s[0] == "t":
            shape = s[2]
            if bad[0]:
                bad[0] = False
                shape = (*shape[:-1], shape[-1] + 1) if shape else (2,)
            z = np.zeros(shape, dtype=np.float64 if C.DTYPES[s[1]][2] == "float" else C.DTYPES[s[1]][1])
            layout = s[3] if shape == s[2] else "contig"
            return C.to_tensor(z, s[1], layout if rng.random() < 0.7 else "contig")
        if s[0] == "dict":
            items = [(k, go(v)) for k, v in s[1]]
            if shuffle is not None:
                shuffle.shuffle(items)
            return dict(items)
        kids = [go(v) for v in s[1]]
        return kids if s[0] == "list" else tuple(kids)

    return go(spec)


def same(got: Any, want: Any, path: str = "") -> str | None:
    """None if `got` equals `want` exactly (types, structure, bits); else where it differs."""
    if isinstance(want, np.ndarray):
        if not isinstance(got, torch.Tensor):
            return f"{path}: got {type(got).__name__}, expected a tensor (sent as a NumPy array)"
        want = torch.from_numpy(want)
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: got {type(got).__name__}, expected a tensor"
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            return f"{path}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
        if C.digest([got]) != C.digest([want]):
            return f"{path}: tensor values differ ({want.dtype} {tuple(want.shape)})"
        return None
    if type(got) is not type(want):
        return f"{path}: got {type(got).__name__} {got!r:.80}, expected {type(want).__name__} {want!r:.80}"
    if isinstance(want, float):
        return None if C.same_float(got, want) else f"{path}: got {got!r}, expected {want!r}"
    if isinstance(want, dict):
        if set(got) != set(want):
            return f"{path}: keys {sorted(map(repr, got))} != {sorted(map(repr, want))}"
        for k in want:
            e = same(got[k], want[k], f"{path}[{k!r}]")
            if e:
                return e
        return None
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            e = same(a, b, f"{path}[{i}]")
            if e:
                return e
        return None
    return None if got == want else f"{path}: got {got!r:.80}, expected {want!r:.80}"


def out_identity(got: Any, out: Any, path: str = "") -> str | None:
    """With out=, the returned tensors are the given ones (matched by key for dicts)."""
    if isinstance(out, torch.Tensor):
        return None if got is out else f"{path}: the returned tensor is not the out= tensor"
    if isinstance(out, dict):
        if not isinstance(got, dict):
            return f"{path}: expected a dict"
        for k in out:
            e = out_identity(got.get(k), out[k], f"{path}[{k!r}]")
            if e:
                return e
        return None
    for i, (a, b) in enumerate(zip(got, out, strict=False)):
        e = out_identity(a, b, f"{path}[{i}]")
        if e:
            return e
    return None


def receive(end: Any, m: dict[str, Any], out: Any) -> Any:
    if m["async"]:
        return end.recv_async(timeout=60, out=out).wait(60)
    return end.recv(timeout=60, out=out)


def check_received(m: dict[str, Any], got: Any, want: Any, out: Any, side: str) -> list[str]:
    errs = []
    e = same(got, want)
    if e:
        errs.append(f"{side}: value differs at {e}")
    if out is not None:
        e = out_identity(got, out)
        if e:
            errs.append(f"{side}: {e}")
    return errs


def order_seed(seed: int, m: dict[str, Any], side: str, flags: dict[str, bool]) -> int | None:
    return C.hash_seed(seed, m["id"], side) if flags["RECV_OUT_BY_KEY"] else None


def echo_main(seed: int, n: int, out_path: str) -> int:
    """The server end: prints its port, serves one client for the seed's program, writes a report."""
    flags = C.load_flags()
    report: dict[str, Any] = {"failures": [], "stopped": None}
    server = parallel.server("127.0.0.1", 0)
    print(server.port, flush=True)
    try:
        server.wait_for(1, timeout=60)
        conn = server.connections()[0]
        for m in program(seed, n, flags):
            want = build(m["spec"], seed, m["id"])
            rng = random.Random(C.hash_seed(seed, m["id"], "srv-layout"))
            out = (
                empty_like_out(m["spec"], order_seed(seed, m, "server", flags), False, rng)
                if m["out_server"]
                else None
            )
            got = receive(conn, m, out)
            for e in check_received(m, got, want, out, "server"):
                report["failures"].append({"case": m["id"], "msg": e, "spec": repr(m["spec"])[:300]})
            if m["async"]:
                conn.send_async(got, timeout=60).wait(60)
            else:
                conn.send(got, timeout=60)
        conn.recv(timeout=60)  # the client's goodbye: everything above was received
    except Exception:  # noqa: BLE001
        report["stopped"] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(report))
    server.close()
    return 0


def client_loop(seed: int, n: int, port: int) -> tuple[list[str], int]:
    """The client end; returns (problems, cases run)."""
    flags = C.load_flags()
    problems: list[str] = []
    client = parallel.client("127.0.0.1", port, timeout=60)
    ran = 0
    try:
        for m in program(seed, n, flags):
            ran += 1
            value = build(m["spec"], seed, m["id"])
            if m["async"]:
                client.send_async(value, timeout=60).wait(60)
            else:
                client.send(value, timeout=60)
            rng = random.Random(C.hash_seed(seed, m["id"], "cli-layout"))
            out = (
                empty_like_out(m["spec"], order_seed(seed, m, "client", flags), m["mismatch"], rng)
                if m["out_client"]
                else None
            )
            where = (
                f"case {m['id']} (out_client={m['out_client']}, out_server={m['out_server']}, "
                f"async={m['async']}) spec {repr(m['spec'])[:300]}"
            )
            try:
                got = receive(client, m, out)
            except Exception as e:  # noqa: BLE001
                if (
                    m["mismatch"]
                    and isinstance(e, parallel.ParallelError)
                    and not isinstance(e, (parallel.ProtocolError, parallel.Closed))
                ):
                    continue  # the message is consumed; the next case checks the link still works
                problems.append(f"{where}: recv raised {type(e).__name__}: {e}")
                break
            if m["mismatch"]:
                problems.append(f"{where}: recv into a mismatched out= did not raise")
                continue
            problems += [f"{where}: {e}" for e in check_received(m, got, value, out, "client")]
        client.send("bye", timeout=60)
    except Exception:  # noqa: BLE001
        problems.append(f"client stopped at case {ran - 1}:\n{traceback.format_exc()}")
    finally:
        time.sleep(0.05)
        client.close()
    return problems, ran
