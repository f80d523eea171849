"""PyTorch reference for `bamba-train bench --collectives MB`: all-gather and
reduce-scatter bus bandwidth of torch.distributed (NCCL) on the same bytes.
  python3 -m torch.distributed.run --nproc_per_node 2 scripts/bench/torch_collectives.py 256
"""
import json, os, sys, time
import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, n = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
full = mb * (1 << 20) // 4 // n * n
big = torch.ones(full, device="cuda")
small = torch.ones(full // n, device="cuda")
for name, f in [
    ("all_gather", lambda: dist.all_gather_into_tensor(torch.empty(full, device="cuda"), small)),
    ("reduce_scatter", lambda: dist.reduce_scatter_tensor(torch.empty(full // n, device="cuda"), big, op=dist.ReduceOp.AVG)),
]:
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    if rank == 0:
        print(json.dumps({"collective": name, "impl": "torch", "ranks": n, "bytes": full * 4,
                          "time_ms": dt * 1e3, "bus_gb_s": (n - 1) / n * full * 4 / dt / 1e9}), flush=True)
dist.destroy_process_group()
