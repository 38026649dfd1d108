"""One process of a differential test.

    diff_worker.py tree SEED NCASES RANK WORLD ROOT OUT   one rank: runs the seed's program of
                                                          collectives, checks every result
    diff_worker.py echo SEED NCASES OUT                   a server: receives the seed's messages
                                                          from one client, checks them, echoes them

Writes a JSON report to OUT: failures (case, what, message), result digests per case (compared
across ranks by the test), the number of cases run, and the traceback that stopped the run, if any.
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases as C  # noqa: E402

import torch_parallel as parallel  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The program: epochs of steps; a step is one collective or an asynchronous group of several.
# ---------------------------------------------------------------------------------------------


def tree_program(seed: int, ncases: int, world: int, flags: dict[str, bool]) -> list[dict[str, Any]]:
    """The same list of epochs on every rank. Each epoch: `steps` (lists of calls), `until[r]`
    (rank r takes part in steps[:until[r]] and then calls done(), if the epoch `ends` with done),
    and the callable this epoch's user-function calls use (`uop`, also passed to done())."""
    rng = random.Random(C.hash_seed("tree", seed, world))
    epochs: list[dict[str, Any]] = []
    cid = 0
    while cid < ncases:
        last = cid >= ncases - 10
        ends = (flags["EPOCHS"] and rng.random() < 0.8) or last
        k = rng.randint(2, 9)
        until = [k] * world
        if ends and rng.random() < 0.75:
            until = [rng.randint(0, k) for _ in range(world)]
            until[rng.randrange(world)] = k
        uop = rng.choice(list(C.CALLABLES))
        steps = []
        for s in range(k):
            part = [r for r in range(world) if until[r] > s]
            step = []
            for _ in range(rng.randint(2, 3) if rng.random() < 0.08 else 1):
                step.append(gen_call(rng, cid, world, part, uop, flags, asyn=False))
                step[-1]["done_op"] = uop if ends and len(part) < world else None
                cid += 1
            if len(step) > 1:  # an asynchronous group: all but maybe the last are async
                for c in step[:-1] if rng.random() < 0.5 else step:
                    if (
                        c["kind"] in ("all_reduce", "broadcast", "barrier")
                        and not C.has_leaf(c["spec"], "n")
                        and not c["expect_error"]
                    ):
                        c["async"] = True
            steps.append(step)
        epochs.append({"steps": steps, "until": until, "ends": ends, "uop": uop})
        if last:
            break
    return epochs


def gen_call(
    rng: random.Random, cid: int, world: int, part: list[int], uop: str, flags: dict[str, bool], asyn: bool
) -> dict[str, Any]:
    uneven = len(part) < world
    kind = rng.choices(
        ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "barrier", "all_to_all"],
        [45, 12, 12, 12, 10, 5, 10],
    )[0]
    if uneven and kind in ("all_gather", "reduce_scatter") and not flags["UNEVEN_GATHER"]:
        kind = "all_reduce"
    call: dict[str, Any] = {"id": cid, "kind": kind, "part": part, "async": False, "expect_error": None}
    call["mode"] = rng.choices(["exact", "random", "wide"], [55, 30, 15])[0]
    if kind in ("all_reduce", "reduce", "reduce_scatter"):
        op = uop if rng.random() < 0.3 else rng.choice(C.BUILTIN_OPS)
        if uneven and not flags["DONE_OP_ONLY_FOR_USER_CALLS"]:
            op = rng.choice(C.BUILTIN_OPS)
        dtypes = C.op_dtypes(op)
        if op == "avg" and flags["AVG_INT_RAISES"] and kind == "all_reduce" and rng.random() < 0.25:
            dtypes = [d for d in C.DTYPES if C.DTYPES[d][2] in ("int", "bool")]
            call["expect_error"] = "avg"
        call["op"] = op
    else:
        call["op"] = None
        dtypes = list(C.DTYPES)
    if kind in ("broadcast", "reduce"):
        call["root"] = rng.choice(part)
        done = [r for r in range(world) if r not in part]
        if done and flags["ROOT_DONE_ERRORS"] and rng.random() < 0.2:
            call["root"] = rng.choice(done)
            call["expect_error"] = "root"
    plain: list[str] = []
    if (
        flags["PLAIN_NUMBERS"]
        and kind in ("all_reduce", "reduce", "broadcast")
        and call["op"] not in C.CALLABLES
    ):
        plain = {
            None: ["int", "float"],
            "avg": ["float"],
            "band": ["int"],
            "bor": ["int"],
            "bxor": ["int"],
        }.get(call["op"], ["int", "float"])
    big = kind in ("all_reduce", "reduce", "broadcast") and rng.random() < 0.05
    if kind == "all_to_all":
        # shapes[s][d]: the piece rank s sends rank d (any size per pair, empty ones included);
        # "outputs": receive into preallocated tensors (of their own layouts) or into new ones.
        call["dtype"] = rng.choice(dtypes)
        call["shapes"] = [[C.gen_shape(rng, rng.random() < 0.03) for _ in range(world)] for _ in range(world)]
        call["layouts"] = [[C.gen_layout(rng, sh) for sh in row] for row in call["shapes"]]
        call["outputs"] = rng.random() < 0.6
    elif kind == "all_gather":
        dt = rng.choice(dtypes)
        call["shapes"] = [C.gen_shape(rng, False) for _ in range(world)]
        call["layouts"] = [C.gen_layout(rng, s) for s in call["shapes"]]
        call["dtype"] = dt
    elif kind == "reduce_scatter":
        shape = C.gen_shape(rng, False)
        while len(shape) == 0:
            shape = C.gen_shape(rng, False)
        call["spec"] = ("t", rng.choice(dtypes), shape, C.gen_layout(rng, shape))
    elif kind != "barrier":
        if rng.random() < 0.4:
            shape = C.gen_shape(rng, big)
            call["spec"] = ("t", rng.choice(dtypes), shape, C.gen_layout(rng, shape))
        else:
            call["spec"] = C.gen_struct(rng, dtypes, plain, big=big)
        no_tensor = not any(s[0] == "t" for _, s in C.leaves(call["spec"]))
        if (call["expect_error"] == "avg" and no_tensor) or (
            not C.leaves(call["spec"]) and not flags["EMPTY_VALUE_COLLECTIVE"]
        ):
            call["spec"] = ("t", rng.choice(dtypes), (3,), "contig")
    call.setdefault("spec", ("list", []))
    return call


def describe(call: dict[str, Any]) -> str:
    extra = {
        k: call[k]
        for k in ("op", "root", "mode", "dtype", "shapes", "expect_error", "async", "done_op")
        if call.get(k)
    }
    spec = repr(call["spec"])
    return f"case {call['id']} {call['kind']} {extra} ranks {call['part']} spec {spec[:300]}"


# ---------------------------------------------------------------------------------------------
# Where the API of issue 10 is not decided yet: the two functions below are the only places that
# interpret all_gather / reduce_scatter results while some ranks are done. Adjust them when the
# API is settled.
# ---------------------------------------------------------------------------------------------


def gathered_by_rank(result: Any, world: int, part: list[int]) -> dict[int, Any]:
    """all_gather's result as {rank: tensor}. Without done ranks: a list in rank order. With done
    ranks (API NOT DECIDED): accepted are a list of `world` entries with None for done ranks, or
    a list of (rank, tensor) pairs of the contributing ranks."""
    if not isinstance(result, list):
        raise AssertionError(f"all_gather returned a {type(result).__name__}, expected a list")
    if result and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], int) for x in result):
        return {int(r): t for r, t in result}
    if len(result) == world:
        return {r: t for r, t in enumerate(result) if t is not None}
    raise AssertionError(f"all_gather returned {len(result)} entries for ranks {part} of {world}")


def scatter_part(full: np.ndarray, rank: int, world: int, part: list[int]) -> np.ndarray:
    """This rank's part of the reduced tensor (ASSUMED while ranks are done: still the world-size
    split along dimension 0, as torch.tensor_split makes it)."""
    return np.array_split(full, world, axis=0)[rank]


# ---------------------------------------------------------------------------------------------
# Running and checking
# ---------------------------------------------------------------------------------------------


class Stop(Exception):
    """An unexpected exception: the ranks may no longer agree on the sequence, so the run stops."""


class Rank:
    def __init__(self, tree: parallel.Tree, seed: int, flags: dict[str, bool]) -> None:
        self.tree, self.seed, self.flags = tree, seed, flags
        self.me, self.world = tree.rank, tree.world_size
        self.failures: list[dict[str, Any]] = []
        self.digests: dict[str, str] = {}
        self.ran = 0

    def fail(self, call: dict[str, Any], msg: str) -> None:
        self.failures.append({"case": call["id"], "rank": self.me, "what": describe(call), "msg": msg})

    def order(self, cid: int) -> int | None:
        return C.hash_seed(self.seed, cid, self.me, "order") if self.flags["DICT_KEY_ORDER"] else None

    def value(self, call: dict[str, Any], rank: int | None = None) -> Any:
        r = self.me if rank is None else rank
        return C.build_value(
            call["spec"], self.seed, call["id"], r, call["mode"], call["op"] or "", self.order(call["id"])
        )

    def inputs(self, call: dict[str, Any], rank: int) -> list[Any]:
        return C.leaf_inputs(call["spec"], self.seed, call["id"], rank, call["mode"], call["op"] or "")

    # -- submission -------------------------------------------------------------------------
    def submit(self, call: dict[str, Any]) -> tuple[Any, Any]:
        """Starts the call; returns (what to check later, a Work or the result)."""
        t, kind = self.tree, call["kind"]
        op = C.op_arg(call["op"]) if call["op"] else None
        if kind == "all_gather":
            a = C.leaf_array(
                self.seed, call["id"], self.me, 0, call["dtype"], call["shapes"][self.me], call["mode"], ""
            )
            x = C.to_tensor(a, call["dtype"], call["layouts"][self.me])
            return x, t.all_gather(x)
        if kind == "barrier":
            return None, (t.barrier_async() if call["async"] else t.barrier())
        if kind == "all_to_all":
            return self.submit_all_to_all(call)
        value = self.value(call)
        if kind == "all_reduce":
            return value, (t.all_reduce_async(value, op) if call["async"] else t.all_reduce(value, op))
        if kind == "broadcast":
            return value, (
                t.broadcast_async(value, call["root"]) if call["async"] else t.broadcast(value, call["root"])
            )
        if kind == "reduce":
            return value, t.reduce(value, op, call["root"])
        if kind == "reduce_scatter":
            return value, t.reduce_scatter(value, op)
        raise AssertionError(kind)

    def piece(self, call: dict[str, Any], s: int, d: int) -> np.ndarray:
        """The NumPy reference of the piece rank s sends rank d in an all_to_all."""
        shape = call["shapes"][s][d]
        return C.leaf_array(self.seed, call["id"], s, d, call["dtype"], shape, call["mode"], "")

    def submit_all_to_all(self, call: dict[str, Any]) -> tuple[Any, Any]:
        me, dt = self.me, call["dtype"]
        ins = [C.to_tensor(self.piece(call, me, d), dt, call["layouts"][me][d]) for d in range(self.world)]
        if not call["outputs"]:
            return (ins, None), self.tree.all_to_all(ins)
        # Preallocated outputs, zero-filled, in the layout the sender's piece has.
        outs = [
            C.to_tensor(np.zeros(call["shapes"][s][me], C.DTYPES[dt][1]), dt, call["layouts"][s][me])
            for s in range(self.world)
        ]
        return (ins, outs), self.tree.all_to_all(ins, outs)

    def check_all_to_all(self, call: dict[str, Any], held: Any, result: Any) -> None:
        ins, outs = held
        me, part, dt = self.me, call["part"], call["dtype"]
        if not isinstance(result, list) or len(result) != self.world:
            self.fail(call, f"all_to_all returned {type(result).__name__} {result!r:.200}, expected a list")
            return
        for s in range(self.world):
            got = result[s]
            if s not in part:
                if got is not None:
                    self.fail(call, f"all_to_all: entry of done rank {s} is {type(got).__name__}, not None")
                if outs is not None and C.check_tensor(
                    outs[s], np.zeros(call["shapes"][s][me]), dt, call["shapes"][s][me], "max", "exact", []
                ):
                    self.fail(call, f"all_to_all: the output for done rank {s} changed")
                continue
            if outs is not None and got is not outs[s]:
                self.fail(call, f"all_to_all: entry {s} is not the output tensor passed")
            want = self.piece(call, s, me)
            err = C.check_tensor(got, want, dt, call["shapes"][s][me], "max", "exact", [want])
            if err:
                self.fail(call, f"all_to_all piece from rank {s} ({call['layouts'][s][me]}): {err}")
        for d in range(self.world):
            if C.digest([ins[d]]) != C.digest([C.to_tensor(self.piece(call, me, d), dt, "contig")]):
                self.fail(call, f"all_to_all changed its input for rank {d}")

    # -- checks -----------------------------------------------------------------------------
    def check(self, call: dict[str, Any], value: Any, result: Any, sync: bool) -> None:
        kind, part, me = call["kind"], call["part"], self.me
        if sync and kind in ("all_reduce", "reduce", "reduce_scatter", "barrier"):
            if self.tree.contributors != len(part):
                self.fail(call, f"contributors {self.tree.contributors}, expected {len(part)}")
        if kind == "barrier":
            if result is not None:
                self.fail(call, f"barrier returned {result!r}")
            return
        if kind == "all_gather":
            self.check_gather(call, result)
            return
        if kind == "all_to_all":
            self.check_all_to_all(call, value, result)
            return
        if kind == "reduce_scatter":
            xs = [self.inputs(call, r)[0] for r in part]
            _, dt, shape, _ = call["spec"]
            full = C.reduce_ref(call["op"], dt, xs)
            want = scatter_part(full, me, self.world, part)
            parts = [scatter_part(x, me, self.world, part) for x in xs]
            err = C.check_tensor(result, want, dt, want.shape, call["op"], call["mode"], parts)
            if err:
                self.fail(call, f"reduce_scatter part: {err}")
            if C.digest([value]) != C.digest([C.to_tensor(self.inputs(call, me)[0], dt, "contig")]):
                self.fail(call, "reduce_scatter changed its input tensor")
            return
        spec = call["spec"]
        try:
            got = C.get_path(result, spec)
            held = C.get_path(value, spec)
        except AssertionError as e:
            self.fail(call, f"result structure: {e}")
            return
        specs = C.leaves(spec)
        if kind == "broadcast":
            want_in = self.inputs(call, call["root"])
            self.compare_exact(call, got, want_in, specs, "broadcast")
            self.check_in_place(call, got, held, specs)
            self.digests[str(call["id"])] = C.digest(got)
            return
        if kind == "reduce" and me != call["root"]:
            self.compare_exact(call, got, self.inputs(call, me), specs, "reduce (not the root: unchanged)")
            return
        per_rank = [self.inputs(call, r) for r in part]
        for i, (path, s) in enumerate(specs):
            xs = [p[i] for p in per_rank]
            if s[0] == "n":
                want = C.reduce_plain(call["op"], xs)
                g = got[i]
                ok = type(g) is type(want) and (
                    g == want
                    if isinstance(want, int)
                    else (
                        C.same_float(g, want) or (call["op"] == "avg" and abs(g - want) <= 1e-12 * abs(want))
                    )
                )
                if not ok:
                    self.fail(call, f"{kind} leaf {path}: got {g!r}, expected {want!r}")
                continue
            want = C.reduce_ref(call["op"], s[1], xs)
            err = C.check_tensor(got[i], want, s[1], s[2], call["op"], call["mode"], xs)
            if err:
                self.fail(call, f"{kind} leaf {path} ({s[1]} {s[2]} {s[3]}): {err}")
        self.check_in_place(call, got, held, specs)
        if kind == "all_reduce":
            self.digests[str(call["id"])] = C.digest(got)

    def check_in_place(self, call: dict[str, Any], got: list[Any], held: list[Any], specs: list[Any]) -> None:
        """Tensor leaves are filled in place: the caller's tensors hold what was returned."""
        for i, (path, s) in enumerate(specs):
            if s[0] == "t" and C.digest([held[i]]) != C.digest([got[i]]):
                self.fail(call, f"leaf {path}: the caller's tensor does not hold the returned result")

    def compare_exact(
        self, call: dict[str, Any], got: list[Any], want: list[Any], specs: list[Any], what: str
    ) -> None:
        for i, (path, s) in enumerate(specs):
            if s[0] == "n":
                if type(got[i]) is not type(want[i]) or not (
                    got[i] == want[i] or C.same_float(got[i], want[i])
                ):
                    self.fail(call, f"{what} leaf {path}: got {got[i]!r}, expected {want[i]!r}")
                continue
            err = C.check_tensor(got[i], want[i], s[1], s[2], "max", "exact", [want[i]])
            if err:
                self.fail(call, f"{what} leaf {path} ({s[1]} {s[2]} {s[3]}): {err}")

    def check_gather(self, call: dict[str, Any], result: Any) -> None:
        part = call["part"]
        try:
            by_rank = gathered_by_rank(result, self.world, part)
        except AssertionError as e:
            self.fail(call, str(e))
            return
        if sorted(by_rank) != sorted(part):
            self.fail(call, f"all_gather returned entries of ranks {sorted(by_rank)}, expected {part}")
            return
        for r in part:
            want = C.leaf_array(
                self.seed, call["id"], r, 0, call["dtype"], call["shapes"][r], call["mode"], ""
            )
            err = C.check_tensor(by_rank[r], want, call["dtype"], call["shapes"][r], "max", "exact", [want])
            if err:
                self.fail(call, f"all_gather entry of rank {r}: {err}")
        self.digests[str(call["id"])] = C.digest([by_rank[r] for r in part])

    def expected_error(self, call: dict[str, Any], e: BaseException) -> None:
        what = call["expect_error"]
        msg = str(e)
        if isinstance(e, (parallel.ProtocolError, parallel.Closed)):
            self.fail(call, f"expected a clear error about {what}, got {type(e).__name__}: {msg}")
        elif what == "avg" and "avg" not in msg:
            self.fail(call, f"avg on integers: the error does not say avg: {type(e).__name__}: {msg}")
        elif what == "root" and "root" not in msg and "done" not in msg:
            self.fail(call, f"done root: the error names neither root nor done: {type(e).__name__}: {msg}")

    # -- a step ------------------------------------------------------------------------------
    def step(self, calls: list[dict[str, Any]]) -> None:
        pending = []
        for call in calls:
            self.ran += 1
            try:
                value, res = self.submit(call)
            except Exception as e:  # noqa: BLE001 - any exception is a finding
                if call["expect_error"]:
                    self.expected_error(call, e)
                    continue
                self.fail(call, f"raised {type(e).__name__}: {e}")
                raise Stop(traceback.format_exc()) from e
            if call["expect_error"]:
                self.fail(call, f"expected an error ({call['expect_error']}), the call returned")
                continue
            if call["async"]:
                pending.append((call, value, res))
            else:
                self.check(call, value, res, sync=True)
        random.Random(calls[0]["id"]).shuffle(pending)
        for call, value, work in pending:
            try:
                res = work.wait(60)
            except Exception as e:  # noqa: BLE001
                self.fail(call, f"wait raised {type(e).__name__}: {e}")
                raise Stop(traceback.format_exc()) from e
            if call["kind"] != "barrier" and res is not value:
                self.fail(call, "Work.wait() did not return the value passed")
            self.check(call, value, None if call["kind"] == "barrier" else res, sync=False)

    def run(self, epochs: list[dict[str, Any]]) -> None:
        for e in epochs:
            mine = e["until"][self.me]
            for calls in e["steps"][:mine]:
                self.step(calls)
            if not e["ends"]:
                continue
            uop = C.CALLABLES[e["uop"]] if self.flags["DONE_OP_ONLY_FOR_USER_CALLS"] else None
            served = self.tree.done(op=uop, timeout=60)
            later = [c for calls in e["steps"][mine:] for c in calls]
            if (
                self.flags["SERVED_COUNTS_CALLS"]
                and not any(c["expect_error"] for c in later)
                and served != len(later)
            ):
                self.failures.append(
                    {
                        "case": later[0]["id"] if later else -1,
                        "rank": self.me,
                        "what": f"done() after {mine} of {len(e['steps'])} steps of an epoch",
                        "msg": f"done() returned {served}, expected {len(later)} collectives served",
                    }
                )


def tree_main(seed: int, ncases: int, rank: int, world: int, root: str, out: str) -> int:
    flags = C.load_flags()
    report: dict[str, Any] = {"rank": rank, "world": world, "seed": seed, "flags": flags, "stopped": None}
    t0 = time.monotonic()
    r: Rank | None = None
    try:
        tree = parallel.tree(rank, world, root, timeout=60)
        r = Rank(tree, seed, flags)
        program = tree_program(seed, ncases, world, flags)
        report["cases"] = sum(len(calls) for e in program for calls in e["steps"])
        r.run(program)
    except Stop as e:
        report["stopped"] = str(e)
    except Exception:  # noqa: BLE001
        report["stopped"] = traceback.format_exc()
    report["seconds"] = round(time.monotonic() - t0, 2)
    if r is not None:
        report.update(failures=r.failures, digests=r.digests, ran=r.ran)
    Path(out).write_text(json.dumps(report))
    return 0


def main() -> int:
    mode = sys.argv[1]
    if mode == "tree":
        seed, n, rank, world = (int(x) for x in sys.argv[2:6])
        return tree_main(seed, n, rank, world, sys.argv[6], sys.argv[7])
    if mode == "echo":
        import endpoint_cases

        return endpoint_cases.echo_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
