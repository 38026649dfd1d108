"""The seed's workqueue example, as written, with `import torch_parallel as parallel`.

Two background workers read file names from a named work queue, load the files and write the
tensors back; `--processes` runs the workers as clean processes that open the queue by name.
"""

import sys
import tempfile

import torch

import torch_parallel as parallel


def worker(mapid):
    # Not a closure: with --processes this runs in a totally clean interpreter
    import torch_parallel as parallel

    # Open the queue by name (the main thread already created it)
    q = parallel.workqueue("my queue")
    # Read file names until the owner closes the queue
    for file_name in q:
        # Load the file and write its contents back into the workqueue
        q.write(torch.load(file_name))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for i in (1, 2, 3):
            torch.save(torch.full((3,), float(i)), f"{d}/f{i}.pt")
        # Create a named workqueue
        q = parallel.workqueue("my queue")
        # Create 2 background workers that read from the named workqueue
        workers = parallel.map(2, worker, processes="--processes" in sys.argv)
        # Write the file names into the workqueue
        q.write(f"{d}/f1.pt")
        q.write(f"{d}/f2.pt")
        q.write(f"{d}/f3.pt")
        # Read back the 3 answers and print them
        print(q.read())
        print(q.read())
        print(q.read())
        # End of queue for the workers, then wait for them
        q.close()
        workers.join()
