"""What the benchmark scripts share: the model under test, toy inputs, timing, peak memory, machine facts, output.

Not a benchmark itself. The scripts beside it import it as `_common` (Python puts a script's own folder on
`sys.path`); the tests put this folder on `sys.path` first.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from twn_cli.engine.config import INTERFACES, TWNConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------- the model
def add_model_arguments(parser, max_think_tokens: int = 16) -> None:
    """--checkpoint / --backbone / device options; neither: a fresh TWN model on a toy backbone built here."""
    group = parser.add_argument_group("model (costs do not depend on training: a fresh model is fine)")
    group.add_argument("--checkpoint", help="a trained TWN checkpoint (its gate, adapters and settings)")
    group.add_argument("--backbone", help="a backbone dir or hub id for a fresh TWN model (default: build the toy backbone)")
    group.add_argument("--device", default="cpu")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2 (default: transformers')")
    group.add_argument("--lora-rank", type=int, default=16, help="fresh model only")
    group.add_argument("--num-queries", type=int, default=4, help="fresh model only")
    group.add_argument("--interface", default=TWNConfig.interface, choices=INTERFACES, help="fresh model only: which adapter encodes what")
    group.add_argument("--max-think-tokens", type=int, default=max_think_tokens, help="CoT budget (overrides a checkpoint's)")


def toy_backbone_dir(work_dir: Path, spec=None) -> Path:
    """Build the toy backbone (the toy recipe's size unless `spec`) under `work_dir`, or reuse one built there."""
    from twn_cli.toyworld.backbone import ToyBackboneSpec, build_toy_backbone

    path = work_dir / "toy-backbone"
    if not (path / "config.json").is_file():
        build_toy_backbone(path, seed=0, spec=spec or ToyBackboneSpec())
    return path


def load_model(arguments, work_dir: Path):
    """The TWN model the arguments name: a checkpoint, or fresh adapters on --backbone (or on the toy backbone)."""
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.factory import LoadOptions, load_model

    options = LoadOptions(device=arguments.device, dtype=arguments.dtype, attn_implementation=arguments.attn_implementation)
    if arguments.checkpoint:
        model = load_model(arguments.checkpoint, options=options)
        model.config.max_think_tokens = arguments.max_think_tokens
        return model
    config = TWNConfig(lora_rank=arguments.lora_rank, lora_alpha=2 * arguments.lora_rank, num_queries=arguments.num_queries,
                       max_think_tokens=arguments.max_think_tokens, interface=arguments.interface)
    model = load_model(backbone=arguments.backbone or str(toy_backbone_dir(work_dir)), config=config, options=options)
    if not arguments.backbone:
        model.backbone.source = "toy backbone (toy recipe size, random weights, built in the run)"
    return model


def model_facts(model) -> dict:
    overhead = model.parameter_overhead()
    return {
        "backbone": model.backbone.source,
        "backbone_parameters": overhead["backbone"],
        "added_parameters": overhead["added"],
        "dtype": str(model.backbone.dtype).replace("torch.", ""),
        "device": str(model.device),
        "num_queries": model.config.num_queries,
        "max_think_tokens": model.config.max_think_tokens,
        "lora_rank": model.config.lora_rank,
        "trained": model.manifest is not None,
    }


@contextmanager
def fixed_length_thoughts(model, enabled: bool = True):
    """Every CoT runs to the full budget: the end marker and end-of-sequence can never be sampled.

    An untrained reasoning adapter stops at random; a trained one at lengths that differ by input. Cost
    comparisons between modes need equal work per thinking input, so by default every CoT is exactly
    `max_think_tokens` long (then the end marker is appended, as for any CoT that hits the budget).
    This reaches into the engine's list of tokens it never samples (`_never_generated`); an engine option
    (e.g. `Sampling(min_new_tokens=...)`) would be the clean way.
    """
    if not enabled:
        yield
        return
    saved = list(model.never_generated)
    banned = set(saved) | set(model.prompts.eos_ids) | {model.prompts.think_end_ids[-1]}
    model.never_generated = sorted(banned)
    try:
        yield
    finally:
        model.never_generated = saved


# ----------------------------------------------------------------------------------------------- inputs
def toy_inputs(count: int, image_size: int, seed: int = 0) -> list:
    """`count` toy-world queries (instruction, text, pictures rendered in memory), in a fixed order."""
    from twn_cli.toyworld.world import generate_world
    from twn_cli.types import ModelInput

    world = generate_world(n=max(count, 20), seed=seed)
    records = [record for split in world.splits.values() for record in split.records]
    inputs = []
    for index in range(count):
        record = records[index % len(records)]
        images = [image.render(image_size) for image in record.images]
        inputs.append(ModelInput(text=record.text, images=images, instruction=record.instruction or None))
    return inputs


def dataset_inputs(path: str, split: str, count: int) -> list:
    """`count` queries of a prepared dataset's split (repeated if it has fewer), their images opened once."""
    from twn_cli.data.prepared import load_prepared, prepared_input

    rows = load_prepared(path).queries[split]
    loaded = [prepared_input(rows[index]) for index in range(min(count, len(rows)))]
    return [loaded[index % len(loaded)] for index in range(count)]


def add_input_arguments(parser) -> None:
    parser.add_argument("--data", help="a prepared dataset whose queries are the inputs (default: toy-world queries made here)")
    parser.add_argument("--split", default="test")
    from twn_cli.toyworld.render import PICTURE_SIZE

    parser.add_argument("--image-size", type=int, default=PICTURE_SIZE,
                        help=f"side of the toy-world pictures in pixels ({PICTURE_SIZE}: the toy world's; 448 gives a real Qwen2-VL 256 image tokens)")


def make_inputs(arguments, count: int) -> list:
    if arguments.data:
        return dataset_inputs(arguments.data, arguments.split, count)
    return toy_inputs(count, image_size=arguments.image_size)


def input_source(arguments) -> str:
    if arguments.data:
        return f"queries of {arguments.data} ({arguments.split}), pictures opened before timing"
    return f"toy-world queries, {arguments.image_size} px pictures rendered in memory"


def batched(items: Sequence, size: int) -> list:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device) -> float:
    """Seconds `function()` takes, the accelerator's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def interleaved(measurements: dict[str, Callable[[], object]], repeats: int, device, warmup: bool = True) -> dict[str, list[float]]:
    """Run every measurement once per round, `repeats` rounds, so slow phases of a shared machine hit all alike."""
    if warmup:
        for function in measurements.values():
            function()
    seconds: dict[str, list[float]] = {name: [] for name in measurements}
    for _ in range(repeats):
        for name, function in measurements.items():
            seconds[name].append(timed(function, device))
    return seconds


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak on a GPU, the process's peak resident set on a CPU.

    On Linux the resident high-water mark is reset through /proc/self/clear_refs, so the peak is the block's
    own; elsewhere it is the process's high-water mark, which only grows (run one block per fresh process).
    `extra_bytes` is the peak above what the process held when the block began.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.extra_bytes = 0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.start = (_proc_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "VmHWM after clear_refs (peak resident set of this block)"
        except OSError:
            self.method = "ru_maxrss (process high-water mark)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = hwm * 1024
        self.extra_bytes = max(0, self.peak_bytes - self.start)
        return False


def mib(count: float) -> float:
    return round(count / 2**20, 1)


# ----------------------------------------------------------------------------------------------- workers
def run_worker(script: str, settings: dict, timeout: float | None = None) -> dict:
    """Run `script --worker JSON` in a fresh Python process; its last stdout line is the JSON it returns."""
    command = [sys.executable, script, "--worker", json.dumps(settings)]
    path = os.pathsep.join(filter(None, [str(Path(script).parent), os.environ.get("PYTHONPATH")]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout} s"}
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"error": f"worker exited with {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- output
def machine_info(device) -> dict:
    import peft
    import transformers

    device = torch.device(device)
    info = {
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
    return info


def finish(figures: dict, output: str | None) -> None:
    """Add the load average at the end (a shared machine shows here) and write the JSON if asked."""
    figures.setdefault("machine", {})["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as handle:
            json.dump(figures, handle, indent=2)
            handle.write("\n")


def measuring_main(arguments, measure: Callable[[dict], dict], run: Callable, report: Callable[[dict], None]) -> dict | None:
    """The main of a benchmark that measures each setting in a fresh process (`run_worker`): as the worker
    (`--worker SETTINGS`), print `measure`'s figures as JSON; otherwise run, report and finish."""
    if arguments.worker:
        print(json.dumps(measure(json.loads(arguments.worker))))
        return None
    figures = run(arguments)
    report(figures)
    finish(figures, arguments.output)
    return figures


def print_table(header: Sequence[str], rows: Iterable[Sequence], first_width: int = 0) -> None:
    """A plain-text table: the first column left-aligned, the others right-aligned, widths fitted to the content."""

    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return "" if value is None else str(value)

    cells = [[text(value) for value in header]] + [[text(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells if column < len(row)) for column in range(len(header))]
    widths[0] = max(widths[0], first_width)
    for row in cells:
        print("  ".join(value.ljust(widths[0]) if column == 0 else value.rjust(widths[column])
                        for column, value in enumerate(row)))


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return f"{'met' if met else 'NOT met'} ({value:.3f} {'<=' if at_most else '>='} {target})"
