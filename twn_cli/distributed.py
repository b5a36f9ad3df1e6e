"""Several processes (torchrun / accelerate launch, which describe the process group in the environment) or one.

train-embed splits each batch over the processes; embed and eval split their inputs, block by block, and
gather the results so that every process holds them in input order and the first one writes them. One
process needs no process group at all.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

import torch

from twn_cli.errors import TWNError

Block = TypeVar("Block")
Result = TypeVar("Result")


def start_process_group() -> None:
    """Join the process group that torchrun / accelerate launch describe in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # Gloo carries CPU tensors and gathered Python objects, NCCL the CUDA tensors.
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        # A group still alive when the interpreter shuts down aborts the process ("terminate called without
        # an active exception"); a command that fails ends it here, one that finishes through end_process_group.
        atexit.register(end_process_group, finished=False)


def end_process_group(*, finished: bool) -> None:
    """Tear the process group down, after every process arrives when the command `finished` its work.

    Gloo aborts a process whose peer closes their connection while it still holds it, so a process that is
    done waits for the others before closing. A failed process cannot wait: the others may never arrive.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def process_device(device: str) -> str:
    """Under several processes, `auto` means this process's own GPU."""
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def batched(items: Iterable, size: int) -> Iterator[tuple]:
    """Consecutive tuples of `size` items, the last one shorter (itertools.batched from Python 3.12)."""
    iterator = iter(items)
    while block := tuple(islice(iterator, size)):
        yield block


class Distributed:
    """The process group, or a single process; only trainable gradients, embeddings and results cross processes."""

    def __init__(self):
        self.active = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.active else 0
        self.world_size = torch.distributed.get_world_size() if self.active else 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank-ordered concatenation of every process's `tensor` (equal shapes)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, items: list) -> list:
        if not self.active:
            return items
        parts: list = [None] * self.world_size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)

    def map_in_order(self, work: Callable[[Block], Result], blocks: Iterable[Block]) -> Iterator[Result]:
        """`work(block)` for every block, yielded in the order of `blocks` in every process.

        Block i is worked on by process i % world_size; after each round of world_size blocks the results
        are gathered, and rank order is block order. Every process must see the same blocks (results must
        pickle, CPU tensors only). A TWNError in one process's work is raised in every process after its
        round, so that none waits for the others forever and all report the same error.
        """
        if not self.active:
            yield from map(work, blocks)
            return
        for round_blocks in batched(blocks, self.world_size):
            outcome = (None, None)
            if self.rank < len(round_blocks):
                try:
                    outcome = (work(round_blocks[self.rank]), None)
                except TWNError as error:
                    outcome = (None, error)
            outcomes = self.gather_objects([outcome])[: len(round_blocks)]
            for _, error in outcomes:
                if error is not None:
                    raise error
            for result, _ in outcomes:
                yield result

    @property
    def is_main(self) -> bool:
        return self.rank == 0
