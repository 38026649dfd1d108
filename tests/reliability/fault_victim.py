"""The victim of the randomized fault loop: a server that answers one good client while hostile
peers attack it. Prints its port, then serves until the good client says "stop".

Good messages are {"good": seq, "data": tensor, "digest": hex}: the victim checks the digest
(a corrupt delivery otherwise), and echoes {"ack": seq, "data": tensor} back. Anything else is
counted and ignored; errors from hostile connections are counted and survived.
Writes a JSON report (argv[1]): good messages, corrupt deliveries, other messages, errors by kind.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import torch_parallel as parallel


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> int:
    report: dict[str, Any] = {"good": 0, "corrupt": [], "other": 0, "errors": Counter()}
    server = parallel.server("127.0.0.1", 0)
    print(server.port, flush=True)
    while True:
        try:
            msg, conn = server.recv_any_from(timeout=120)
        except parallel.Timeout:
            report["errors"]["timeout (nothing for 120 s)"] += 1
            break
        except parallel.ParallelError as e:
            report["errors"][type(e).__name__] += 1
            continue
        if msg == "stop":
            conn.send("stopped", timeout=10)
            break
        if isinstance(msg, dict) and "good" in msg:
            data = msg.get("data")
            if not isinstance(data, torch.Tensor) or digest(data) != msg.get("digest"):
                report["corrupt"].append(msg.get("good"))
            else:
                report["good"] += 1
            try:
                conn.send({"ack": msg.get("good"), "data": data}, timeout=30)
            except parallel.ParallelError as e:
                report["errors"]["reply " + type(e).__name__] += 1
        else:
            report["other"] += 1
    report["errors"] = dict(report["errors"])
    Path(sys.argv[1]).write_text(json.dumps(report))
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
