"""Peak memory of one train.py run, per process (bench.py --only fsdp, tests/test_fsdp.py):
`python tests/measure_peak.py WARMUP_MODEL train.py flags...`, under torchrun too. Prints "peak RANK BYTES"
and, on rank 0, "estimate BYTES" (train.py --estimate_memory's total).

A first short run on WARMUP_MODEL (a tiny checkpoint) touches the code paths of training, whose
pages are not the run's memory; then the peak resident size (VmHWM) is reset and the real run
measured from there. Run it with MALLOC_MMAP_THRESHOLD_=65536, so that freed buffers go back to
the system and the resident size follows what is alive rather than what the allocator keeps.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from config import parse_args  # noqa: E402
import distributed  # noqa: E402
import memory  # noqa: E402
import train  # noqa: E402


def resident(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


cfg = parse_args(sys.argv[2:])
rank, world, device = distributed.setup(cfg.fsdp)
warmup = dataclasses.replace(cfg, model_path=sys.argv[1], output_dir=f"{cfg.output_dir}-warmup{rank}")
train.train(warmup, rank, world, device)
if device.type == "cuda":  # the device's memory: what the estimate is for
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train.train(cfg, rank, world, device)
    peak = torch.cuda.max_memory_allocated() - before
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = resident("VmRSS:")
    train.train(cfg, rank, world, device)
    peak = resident("VmHWM:") - before
sys.stdout.write(f"peak {rank} {peak}\n")  # one write: ranks share the pipe
sys.stdout.flush()
if rank == 0:
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")  # the estimate assumes bf16 if not told
    estimate = memory.estimate_for_run(dataclasses.replace(cfg, world_size=world, precision=precision))
    sys.stdout.write(f"estimate {estimate['total']}\n")
if world > 1 or cfg.fsdp:
    dist.destroy_process_group()
