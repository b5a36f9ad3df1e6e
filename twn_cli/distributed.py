"""Several processes (torchrun / accelerate launch, which describe the process group in the environment) or one.

train-embed splits each batch over the processes; embed and eval split their inputs, block by block, and
gather the results so that every process holds them in input order and the first one writes them. One
process needs no process group at all.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import torch

from twn_cli.errors import TWNError

Block = TypeVar("Block")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

# How many of its blocks a process prepares ahead of the one its model works on.
PREPARED_AHEAD = 1


def start_process_group() -> None:
    """Join the process group that torchrun / accelerate launch describe in the environment, if any."""
    plugins = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
    if plugins:
        # twn runs its own process group and would silently train unsharded under those configs.
        raise TWNError(
            f"accelerate's {' and '.join(plugins)} config is not used by twn: launch with a plain multi-GPU config "
            "(or torchrun) and shard the backbone with the train-embed setting shard_backbone: true"
        )
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
    """Under several processes, `auto` and `cuda` mean this process's own GPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def batched(items: Iterable, size: int) -> Iterator[tuple]:
    """Consecutive tuples of `size` items, the last one shorter (itertools.batched from Python 3.12)."""
    iterator = iter(items)
    while block := tuple(islice(iterator, size)):
        yield block


def prepared_ahead(
    blocks: Iterable[Block], prepare: Callable[[Block], Prepared], mine: Callable[[int], bool], depth: int = PREPARED_AHEAD
) -> Iterator[tuple[Block, tuple[Prepared | None, TWNError | None]]]:
    """(block, (prepare(block), None)) for each block, or (block, (None, error)) when preparing it raised a
    TWNError, or (block, (None, None)) for blocks that are not `mine(index)`.

    A background thread draws the blocks and prepares this process's own, at most `depth` of them ahead of
    the one the consumer has taken; other processes' blocks pass straight through. Any other failure, in
    drawing or preparing, is raised here.
    """
    handed: queue.Queue = queue.Queue()
    free_slots = threading.Semaphore(depth)
    stopped = threading.Event()

    def wait_for_a_slot() -> bool:
        while not stopped.is_set():
            if free_slots.acquire(timeout=0.1):
                return True
        return False

    def produce() -> None:
        try:
            for index, block in enumerate(blocks):
                outcome = (None, None)
                if mine(index):
                    if not wait_for_a_slot():
                        return
                    try:
                        outcome = (prepare(block), None)
                    except TWNError as error:
                        outcome = (None, error)
                handed.put((index, block, outcome))
            handed.put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            handed.put(_Failure(error))

    thread = threading.Thread(target=produce, name="twn-prepare", daemon=True)
    thread.start()
    try:
        while (item := handed.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            index, block, outcome = item
            if mine(index):
                free_slots.release()
            yield block, outcome
    finally:
        stopped.set()


def prepared_in_order(blocks: Iterable[Block], prepare: Callable[[Block], Prepared]) -> Iterator[Prepared]:
    """`prepare(block)` for every block, prepared ahead in a background thread (one process's view of
    `prepared_ahead`); a TWNError in preparing a block is raised when that block's turn comes."""
    prepared = prepared_ahead(blocks, prepare, mine=lambda index: True)
    try:
        for _, (ready, error) in prepared:
            if error is not None:
                raise error
            yield ready
    finally:
        prepared.close()  # stops the thread now, also when the consumer stops early


_END = object()


@dataclass
class _Failure:
    error: BaseException


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

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a scalar over the processes (the scalar itself for one process)."""
        if not self.active:
            return value
        return self.gather(value.detach().reshape(1)).sum()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the processes."""
        return self.sum(value) / self.world_size

    def gather_objects(self, items: list) -> list:
        if not self.active:
            return items
        parts: list = [None] * self.world_size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the processes; a parameter that no process gave a gradient keeps none (so
        the optimiser skips it, as with one process)."""
        if not self.active:
            return
        has_gradient = torch.tensor([parameter.grad is not None for parameter in parameters], dtype=torch.int32)
        torch.distributed.all_reduce(has_gradient)
        for parameter, anywhere in zip(parameters, has_gradient.tolist()):
            if not anywhere:
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)

    def map_in_order(
        self, work: Callable[[Prepared], Result], blocks: Iterable[Block], prepare: Callable[[Block], Prepared]
    ) -> Iterator[Result]:
        """`work(prepare(block))` for every block, yielded in the order of `blocks` in every process.

        Block i is worked on by process i % world_size; after each round of world_size blocks the results
        are gathered, and rank order is block order. Every process must see the same blocks (results must
        pickle, CPU tensors only). `prepare` (reading and decoding a block's files) runs in a background
        thread, up to PREPARED_AHEAD of this process's blocks ahead, so that it overlaps the model's work;
        that thread also draws the blocks, so a stream (stdin) is never read further than it has been
        written. A TWNError in one process's preparation or work is raised in every process after its
        round, so that none waits for the others forever and all report the same error.
        """
        if not self.active:
            ready = prepared_in_order(blocks, prepare)
            try:
                yield from map(work, ready)
            finally:
                ready.close()
            return
        prepared = prepared_ahead(blocks, prepare, mine=lambda index: index % self.world_size == self.rank)
        try:
            yield from self._work_in_rounds(work, prepared)
        finally:
            prepared.close()  # stops the thread now, also when the consumer stops early

    def _work_in_rounds(self, work: Callable[[Prepared], Result], prepared: Iterator) -> Iterator[Result]:
        for round_blocks in batched(prepared, self.world_size):
            outcome = (None, None)
            if self.rank < len(round_blocks):
                _, (ready, error) = round_blocks[self.rank]
                outcome = (None, error)
                if error is None:
                    try:
                        outcome = (work(ready), None)
                    except TWNError as failure:
                        outcome = (None, failure)
            outcomes = self.gather_objects([outcome])[: len(round_blocks)]
            for _, error in outcomes:
                if error is not None:
                    raise error
            for result, _ in outcomes:
                yield result

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def shard_language_model(model: torch.nn.Module, device: torch.device) -> int:
    """Shard the frozen weights of `model`'s language-model layers over the processes (FSDP2), then move
    everything to `device`; returns the number of sharded layers.

    `model` may sit on the CPU, so that no device ever holds the whole backbone. Each decoder layer becomes
    one FSDP unit: its frozen weights live one share per process and are gathered for its forward and its
    backward only. The LoRA weights inside stay whole on every process, like the queries, the gate, the
    embeddings and the vision tower, so their gradients are summed as without sharding and checkpoints are
    written as without it. The language model holds nearly all of a large backbone's weights and runs in
    every pass; the vision tower runs only for batches with pictures, which differ between processes, so it
    is not sharded: processes must call the sharded layers in the same order (`backbone_is_sharded`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    layers = getattr(model.backbone.model.get_decoder(), "layers", None)
    if not layers:
        raise TWNError(f"cannot shard '{model.backbone.source}': its language model has no `layers` list")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh places each process's shards on its current device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in layers:
        adapters = {parameter for name, parameter in layer.named_parameters() if "lora_" in name}
        # Each layer is its own FSDP root, and roots keep their weights gathered after forward unless told not to.
        fully_shard(layer, mesh=mesh, ignored_params=adapters, reshard_after_forward=True)
    with torch.no_grad():
        for module in model.modules():
            for _, parameter in module.named_parameters(recurse=False):
                if not isinstance(parameter, DTensor):
                    parameter.data = parameter.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    return len(layers)


def backbone_is_sharded(model: torch.nn.Module) -> bool:
    """Whether `shard_language_model` sharded `model`: then every process must run the same forward passes."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())
