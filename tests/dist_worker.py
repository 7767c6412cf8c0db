"""Worker run by tests/test_dist_util.py under mpiexec (or with torchrun/SLURM variables).

Usage: python tests/dist_worker.py CHECKPOINT OUT_DIR
Each rank writes OUT_DIR/rank{r}.json with what it observed; the test checks the files.
"""

import json
import os
import sys

import torch

from guided_diffusion import dist_util


def main():
    ckpt, out_dir = sys.argv[1], sys.argv[2]
    dist_util.setup_dist()
    dist_util.setup_dist()  # idempotent
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    result = {"rank": rank, "world": world, "launcher": dist_util.launcher(),
              "local_rank": dist_util.get_local_rank(), "device": str(dist_util.dev()),
              "mpi4py_imported": "mpi4py" in sys.modules}

    x = torch.tensor([float(rank + 1)])
    dist_util.all_reduce(x)
    result["all_reduce"] = x.item()
    y = torch.tensor([float(rank)])
    result["all_reduce_avg"] = dist_util.all_reduce(y, op="avg").item()
    result["gathered"] = dist_util.all_gather_object({"rank": rank, "text": "r" * (rank + 1)})

    # Only rank 0 may touch the file: the others must get the bytes by broadcast, in many chunks.
    dist_util.BROADCAST_CHUNK_BYTES = 4096
    if rank != 0:
        def refuse(path):
            raise AssertionError("a rank other than 0 tried to read the checkpoint")
        dist_util.read_bytes = refuse
    state = dist_util.load_state_dict(ckpt, map_location="cpu", weights_only=True)
    result["state_keys"] = sorted(state)
    result["state_sum"] = float(sum(v.double().sum() for v in state.values()))

    try:
        dist_util.load_state_dict(os.path.join(out_dir, "does-not-exist.pt"))
        result["missing_error"] = None
    except FileNotFoundError as e:
        result["missing_error"] = str(e)

    params = [torch.full((3,), float(rank)), torch.nn.Parameter(torch.full((2, 2), float(rank * 10)))]
    dist_util.sync_params(params)
    result["synced"] = [p.detach().sum().item() for p in params]

    dist_util.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist_util.cleanup_dist()


if __name__ == "__main__":
    main()
