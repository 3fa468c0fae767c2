"""One run on several processes: `torchrun ... -m core train` with DistributedDataParallel.

torchrun starts the same command once per GPU (or CPU process) and tells each its place through the
environment (RANK, LOCAL_RANK, WORLD_SIZE). `joined_processes()` joins them into one process group and
yields a `DistributedContext`: which images are this process's, sums and gathers over all processes,
whether any of them was asked to stop. The training loop asks it for exactly these things, so that with
one process (`SINGLE_PROCESS`: no torchrun, or --nproc_per_node 1) there is no process group and no
collective, every method hands its input back, and a run's numbers are those of an ordinary run bit for bit.

What a run under torchrun means:
- `--batch-size` is the global batch. Every process draws the same epoch order (the sampling generator is
  seeded by the config's seed everywhere), cuts it into the same batches as one process would, and trains on
  rows rank, rank + world, ... of each; DDP averages the gradients, each process's loss weighted by its share
  (`weighted_loss`) so that the average is the whole batch's gradient. An epoch therefore has the optimizer steps
  of a one-process run (`steps_per_epoch` in core.training.loop), except that a last partial batch is kept
  only when it gives every process at least 2 images (batch norm).
- Augmentation and dropout differ per process: each epoch they are seeded from (seed, epoch, rank), which
  also makes a resumed epoch draw what it would have drawn without the stop.
- Batch norm normalises with each process's own share; its running statistics are rank 0's, as DDP keeps
  them (`broadcast_buffers`); they are copied to every process before each evaluation.
- Validation, test and training predictions: each process evaluates a contiguous shard and the shards are
  gathered on every process (all of them agree on the best epoch), in the order of one process.
- Only rank 0 writes the run store and reports progress; the others keep the same run record in memory.
- A stop (SIGTERM) reaching any process is agreed on after every batch: all stop after the same batch.
- A failure on one process ends it; the others' next collective fails (or torchrun ends them), and rank 0
  stores the run as failed, resumable from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from core.runs import RunFolder

Result = TypeVar("Result")

# Rank 0 may prepare (decode) a large dataset while the others wait for it at the first agreement.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class PeerError(ValueError):
    """Another process of the same torchrun job failed; the message names its rank and its error."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the processes of one run; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    nodes: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run store and reports progress."""
        return self.rank == 0

    def describe(self) -> dict:
        """The block run.json's environment gets under torchrun (nothing for a single process)."""
        if not self.is_distributed:
            return {}
        return {"distributed": {"world_size": self.world_size, "backend": self.backend, "nodes": self.nodes}}

    # Which images are this process's.

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's part of a global training batch: rows rank, rank + world, ..."""
        return rows[self.rank:: self.world_size] if self.is_distributed else rows

    def shard(self, count: int) -> range:
        """This process's contiguous part of `count` images to evaluate; the shards in rank order are all of
        them, in order."""
        return range(count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size)

    def check_batch_size(self, batch_size: int, train_size: int) -> None:
        """ValueError unless every process gets at least 2 training images per batch (batch norm)."""
        if self.is_distributed and min(batch_size, train_size) < 2 * self.world_size:
            raise ValueError(f"--batch-size is the global batch under torchrun: {self.world_size} processes need "
                             f"at least {2 * self.world_size} images per batch (2 each, for batch norm), and as "
                             f"many training images; got a batch of {batch_size} and {train_size} training images")

    def weighted_loss(self, loss: torch.Tensor, share: int, batch: int) -> torch.Tensor:
        """The loss this process backpropagates. DDP averages the processes' gradients; weighting each mean
        loss by share x world / batch makes that average the gradient of the whole batch's mean loss, as on
        one process, also when the shares differ by one image."""
        return loss * (share * self.world_size / batch) if self.is_distributed else loss

    def augmentation_generator(self, sampling: torch.Generator, seed: int, epoch: int) -> torch.Generator:
        """The generator of this epoch's augmentation. One process: the sampling generator itself, as ever.
        Several: a generator, and torch's own (dropout), seeded from (seed, epoch, rank), so that processes
        augment differently while the order drawn from the sampling generator stays the same on all."""
        if not self.is_distributed:
            return sampling
        augmentation_seed, dropout_seed = np.random.SeedSequence([seed % 2**63, epoch, self.rank]).generate_state(2)
        torch.manual_seed(int(dropout_seed))
        return torch.Generator().manual_seed(int(augmentation_seed))

    # Collectives: each is a no-op for a single process and must be reached by every process in the same order.

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if not self.is_distributed:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def should_stop(self, stop: threading.Event) -> bool:
        """Whether any process was asked to stop; then `stop` is set on every process, so that all of them
        stop after the same batch (and a CLI loop over several runs ends on all of them)."""
        if not self.is_distributed:
            return stop.is_set()
        flag = torch.tensor([int(stop.is_set())])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            stop.set()
        return bool(flag.item())

    def gather(self, value) -> list:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.is_distributed:
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def concatenate(self, array: np.ndarray) -> np.ndarray:
        """The processes' arrays joined in rank order, on every process."""
        return np.concatenate(self.gather(array)) if self.is_distributed else array

    def copy_buffers_from_main(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every process: each process's last training step
        updated its own, and every process must evaluate the same model."""
        if self.is_distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: wrapped in DistributedDataParallel under torchrun (gradients averaged over the
        processes), the model itself otherwise. Evaluate and save the unwrapped model."""
        if not self.is_distributed:
            return model
        device = next(model.parameters()).device
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def run_on_main(self, function: Callable[[], Result]) -> Result:
        """`function()` on rank 0 only (reading or writing the run store); its result, or its error, reaches
        every process. On the others the error is a PeerError with rank 0's message."""
        if not self.is_distributed:
            return function()
        outcome: list = [None]
        failure = None
        if self.is_main:
            try:
                outcome = [(function(), None)]
            except Exception as error:  # noqa: BLE001 - handed to every process, then raised here again
                failure, outcome = error, [(None, _one_line(error))]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        result, message = outcome[0]
        if message is not None:
            raise PeerError(f"rank 0: {message}")
        return result

    def agree(self, function: Callable[[], Result], local_main_first: bool = False) -> Result:
        """`function()` on every process (preparing the data); when it fails on any of them it fails on all,
        before anything further is done or written. `local_main_first`: each machine's local rank 0 goes
        first, the others wait and then find what it cached."""
        if not self.is_distributed:
            return function()
        waits = local_main_first and self.local_rank != 0
        if waits:
            torch.distributed.barrier()
        try:
            result, failure = function(), None
        except Exception as error:  # noqa: BLE001 - every process learns of it below, then it is raised
            result, failure = None, error
        if local_main_first and not waits:
            torch.distributed.barrier()
        messages = self.gather(None if failure is None else _one_line(failure))
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message is not None:
                raise PeerError(f"rank {rank}: {message}")
        return result


SINGLE_PROCESS = DistributedContext()


def launched_by_torchrun(environ=os.environ) -> bool:
    return int(environ.get("WORLD_SIZE", "1")) > 1


def start_distributed(environ=os.environ) -> DistributedContext:
    """Join the process group torchrun's environment describes (gloo for CPU tensors, and NCCL for CUDA
    tensors where there is CUDA, each process on the GPU of its LOCAL_RANK); SINGLE_PROCESS without torchrun."""
    if not launched_by_torchrun(environ):
        return SINGLE_PROCESS
    rank, world_size, local_rank = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    backend = "gloo"
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own: "
                             f"--nproc_per_node must not exceed its {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # the small agreements stay on the CPU, gradients go through NCCL
    torch.distributed.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    context = DistributedContext(rank, world_size, local_rank, backend)
    hosts = context.gather(socket.gethostname())
    return DistributedContext(rank, world_size, local_rank, backend, nodes=len(set(hosts)))


@contextlib.contextmanager
def joined_processes(environ=os.environ) -> Iterator[DistributedContext]:
    """The processes of a torchrun launch as one run for the `with` block (a single process without torchrun).
    Only rank 0 prints; an error leaves the block on every process and is printed by each. On a normal end
    all processes wait for each other, so that no process exits while rank 0 still writes (torchrun ends
    every process as soon as one exits with an error status, and a stopped run exits with one)."""
    context = start_distributed(environ)
    if not context.is_distributed:
        yield context
        return
    try:
        with contextlib.ExitStack() as quiet:
            if not context.is_main:
                silent = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stdout(silent))
                quiet.enter_context(contextlib.redirect_stderr(silent))
            yield context
        with contextlib.suppress(RuntimeError):  # a process that died already: nothing left to wait for
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class DetachedFolder(RunFolder):
    """The run folder as the processes other than rank 0 hold it: the same record, updated in memory only;
    rank 0 writes the files."""

    def update(self, **fields) -> dict:
        self.record.update(fields)
        self.record["updated_at"] = time.time()
        return self.record

    def save_model(self, state_dict: dict) -> None:
        pass

    def save_table(self, name: str, table) -> None:
        pass

    def save_resume_state(self, state: dict) -> None:
        pass

    def discard_resume_state(self) -> None:
        pass


def open_on_main(context: DistributedContext, open_folder: Callable[[], RunFolder]) -> RunFolder:
    """The run's folder: created or opened (and written) by rank 0 only; the others get a DetachedFolder
    with rank 0's record (the same run id)."""
    folder = context.run_on_main(open_folder)
    return folder if context.is_main else DetachedFolder(folder.path, dict(folder.record))
