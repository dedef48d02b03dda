"""Data-parallel training over several processes, and the command that starts them.

A phase with nproc_per_node x nnodes > 1 processes: `python -m pipeline train` re-launches itself
under torchrun (`launch_command`): `--standalone` on one node; under SLURM with several nodes, one
torchrun per node through srun, meeting at a c10d rendezvous on the job's first node. Each process
then trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU):

  * the global batch stays batch_size: rank r decodes rows [r*b, (r+1)*b) of batch k
    (b = batch_size / world), so batch k is a function of (seed, k) whatever the process count,
    and a killed run resumes under another count;
  * only rank 0 writes (preflight, metrics, TensorBoard, checkpoints, pruning, outputs);
  * every rank skips the same non-finite steps: a NaN loss or gradient on any rank makes the
    averaged gradient, hence its norm, non-finite on every rank;
  * a stop request (SIGTERM...) on any rank stops every rank after the same step;
  * validation is split across ranks and summed;
  * the logged losses are the whole batch's: each rank's terms (means over its rows, which are
    equal shares) averaged over ranks (`Group.mean_terms`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

PORT = 29500


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list) -> list:
        """Element-wise sum of a list of floats over ranks (itself when alone)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return t.tolist()

    def mean_terms(self, terms: dict) -> dict[str, float]:
        """{name: value} -> {name: float}, each value the mean over this rank's micro-batches (a
        list of scalars, tensors or floats; or one scalar), then over ranks: the whole batch's
        term when every rank holds an equal share of it. One all_reduce of the stacked values
        and one .tolist() (a single host sync). Every rank must call it with the same names."""
        if not terms:
            return {}
        values = [v if isinstance(v, (list, tuple)) else [v] for v in terms.values()]
        if self.world > 1:
            device = _device()
        else:                   # where the values are: no copy before the one .tolist()
            device = next((p.device for v in values for p in v if isinstance(p, torch.Tensor)), torch.device("cpu"))
        t = torch.stack([torch.stack([torch.as_tensor(p).detach().to(device, torch.float64).reshape(()) for p in v]).mean()
                         for v in values])
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return dict(zip(terms, t.tolist()))

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_grads(self, params) -> None:
        """Average the gradients of `params` over ranks (for what DDP does not wrap)."""
        if self.world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init(device_name: str) -> tuple[Group, torch.device]:
    """The process group torchrun describes in the environment (none: one process), and this
    process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from ..gpus import pick_device
    device = pick_device(device_name)
    if world == 1:
        return Group(), device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), world, local), device


def close(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launch_command(argv: list, nproc_per_node: int, nnodes: int, env=os.environ, hostnames=None) -> list | None:
    """The command that runs `python -m pipeline <argv>` as nproc_per_node x nnodes processes, or
    None when one process does (or when this already is one of them)."""
    if nproc_per_node * nnodes == 1 or "LOCAL_RANK" in env:
        return None
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    tail = ["-m", "pipeline", *argv]
    if nnodes == 1:
        return [*run, "--standalone", "--nnodes=1", *tail]
    if "SLURM_JOB_ID" not in env:
        raise RuntimeError(f"nnodes {nnodes} needs a SLURM allocation of {nnodes} nodes (srun starts one "
                           "torchrun per node); elsewhere start torchrun on each node yourself")
    first = (hostnames or _slurm_hostnames)(env["SLURM_JOB_NODELIST"])[0]
    port = env.get("MASTER_PORT", str(PORT))
    return ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *run, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={first}:{port}",
            f"--rdzv-id={env['SLURM_JOB_ID']}", *tail]


def _slurm_hostnames(nodelist: str) -> list:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()
