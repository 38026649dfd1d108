"""The seed's map example, as written, with `import torch_parallel as parallel`.

Writes three tensor files, then loads them in parallel: threads by default, or clean worker
processes with `--processes` (their tensors come back through shared memory).
"""

import sys
import tempfile

import torch

import torch_parallel as parallel


def load(file_names, mapid):
    return torch.load(file_names[mapid])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        names = [f"{d}/f{i}.pt" for i in (1, 2, 3)]
        for i, name in enumerate(names, start=1):
            torch.save(torch.full((3,), float(i)), name)
        # Load 3 files in parallel
        t1, t2, t3 = parallel.map(3, load, names, processes="--processes" in sys.argv).join()
        print(t1, t2, t3)
