"""The processes of one training run: one, several under ``torchrun``, or Ray Train workers.

Why not ``DistributedDataParallel``: a supernet step runs several subnets (the sandwich) through
one set of shared weights, each leaving other weight slices (and sometimes whole parameters)
untouched. DDP reduces once per backward and must be told which parameters a forward will not
use; with four backwards a step it would reduce four times or hang on a parameter the last subnet
skipped. Here every process accumulates the gradients of all its micro-batches and subnets
locally, then ``reduce_gradients`` averages them across processes in one collective per step.
Every rank draws the same subnets, so the same parameters carry gradients everywhere; that is
checked, not assumed, so a mismatch fails loudly instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from nas.errors import UserError
from nas.training.devices import resolve_device
from nas.training.precision import check_precision


@dataclass
class World:
    """This process's place in the run: rank 0 alone writes checkpoints, logs and progress."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single, torchrun or ray
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this module started the process group and ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.size, "launcher": self.launcher, "device": str(self.device)}

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over all processes: one flat all-reduce per step."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        count = torch.tensor([len(grads), -len(grads)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        if count[0] != -count[1]:
            raise RuntimeError(
                f"rank {self.rank}: processes hold gradients for {-count[1]}..{count[0]} parameters; every rank "
                "must run the same subnets on each step"
            )
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(reduced.view_as(g))

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Rank 0's weights everywhere (the seeded initialisation should agree already; this makes sure)."""
        if self.size > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def mean(self, value: float) -> float:
        """The mean of a per-process number (e.g. a loss) over all processes."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def restarted() -> bool:
    """Whether torchrun restarted this process group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def start(device_spec: str = "auto", precision: str = "fp32") -> World:
    """This process's ``World``: the process group Ray Train set up, torchrun's, or a single process.

    Under several processes ``auto``/``cuda`` take the GPU of the process's local rank; the
    backend is NCCL on GPUs and gloo on CPUs. A device this machine lacks, or a precision the
    device cannot train in, is refused here, before anything is written.
    """
    device = resolve_device(device_spec)
    check_precision(precision, device)
    per_process = device_spec.strip() in ("auto", "cuda")  # not a GPU named by number
    if dist.is_initialized():  # Ray Train's TorchTrainer sets the group up before the loop runs
        return _world(dist.get_rank(), dist.get_world_size(), _local_rank(), "ray", device, per_process, owns=False)
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(device=device)
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), _local_rank()
    world = _world(rank, size, local, "torchrun", device, per_process, owns=True)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=_attempt_store(rank, size), rank=rank, world_size=size)
    return world


def _attempt_store(rank: int, size: int) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart.

    A group that torchrun restarts (``--max-restarts``) meets in the same store as the one that
    failed; without a fresh prefix gloo reads the dead processes' addresses and never connects.
    """
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=rank == 0 and not agent_serves
    )
    return dist.PrefixStore(f"vitnas/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _world(rank, size, local, launcher, device: torch.device, per_process: bool, owns: bool) -> World:
    if device.type == "cuda" and per_process:
        if local >= torch.cuda.device_count():
            raise UserError(
                f"process {rank} (local rank {local}) has no GPU: {torch.cuda.device_count()} visible here"
            )
        device = torch.device("cuda", local)
    return World(rank, size, local, launcher, device, owns)
