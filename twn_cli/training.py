"""What every training stage shares: the learning-rate schedule, resumable states, the metrics log.

A run directory holds the final checkpoint at its top level (so `--checkpoint RUN` works for later stages)
and, in `train/`, the metrics log and the last resumable states:

    RUN/train/metrics.jsonl                   one JSON object per logged step
    RUN/train/states/step-00000050/           a full TWN checkpoint + trainer_state.pt, written atomically
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from twn_cli.errors import TWNError, torch_load_refusal
from twn_cli.locks import OutputLock, lock_output

log = logging.getLogger(__name__)

TRAIN_DIR = "train"
TRAINER_STATE = "trainer_state.pt"


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class RunDirectory:
    """The `train/` part of a run directory: metrics log and resumable training states."""

    def __init__(self, run_dir: str | Path, keep_states: int = 2, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.train_dir = self.run_dir / TRAIN_DIR
        self.states_dir = self.train_dir / "states"
        self.metrics_path = self.train_dir / "metrics.jsonl"
        self.tensorboard_dir = self.train_dir / "tensorboard"
        self.keep_states = keep_states
        self.tensorboard = tensorboard
        self._writer = None

    def check(self, resume: bool) -> None:
        """Refuse, before any work, a folder that is not a run's, another run's states (unless resuming), and a
        resume with nothing to resume or from a state with non-finite weights."""
        from twn_cli.engine.checkpoint import check_checkpoint_output, non_finite_weights

        check_checkpoint_output(self.run_dir)
        latest = self.latest_state()
        if not resume and latest is not None:
            raise TWNError(f"'{self.run_dir}' holds a run already: pass --resume to continue it, or choose another -o")
        if not resume:
            return
        if latest is None:
            raise TWNError(f"nothing to resume in '{self.run_dir}': it holds no training state")
        broken = non_finite_weights(latest)
        if broken:
            good = self.last_good_state()
            advice = f"remove it to resume from '{good}'" if good else "no saved state is finite: start again"
            counts = ", ".join(f"{count:,} in {name}" for name, count in broken.items())
            raise TWNError(f"state '{latest}' holds non-finite weights ({counts}): refusing to resume from it; {advice}")

    def start(self, resume: bool) -> None:
        """Begin a run: a fresh one refuses to overwrite another run's states unless it resumes."""
        self.check(resume)
        self.states_dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard:
            writer = self._tensorboard_writer()
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(name, value, record["step"])
            writer.flush()

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def truncate_log(self, after_step: int) -> None:
        """Drop log lines past `after_step`: a resumed run logs them again (TensorBoard events too)."""
        if self.tensorboard:
            self._tensorboard_writer(purge_step=after_step + 1)
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= after_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _tensorboard_writer(self, purge_step: int | None = None):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TWNError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge_step)
        return self._writer

    def state_path(self, step: int) -> Path:
        return self.states_dir / f"step-{step:08d}"

    def saved_states(self) -> list[Path]:
        """The complete states, oldest first (interrupted writes never leave one that looks complete)."""
        if not self.states_dir.is_dir():
            return []
        steps = sorted(
            int(match.group(1))
            for path in self.states_dir.iterdir()
            if (match := re.fullmatch(r"step-(\d+)", path.name)) and (path / TRAINER_STATE).is_file()
        )
        return [self.state_path(step) for step in steps]

    def latest_state(self) -> Path | None:
        states = self.saved_states()
        return states[-1] if states else None

    def last_good_state(self) -> Path | None:
        """The newest state whose weights are all finite."""
        from twn_cli.engine.checkpoint import non_finite_weights

        return next((state for state in reversed(self.saved_states()) if not non_finite_weights(state)), None)

    def guarded_step(self, trainer) -> dict:
        """`trainer.step()`; a non-finite loss, gradient or update (its FloatingPointError) stops training,
        naming the last state whose weights are finite."""
        try:
            return trainer.step()
        except FloatingPointError as error:
            last = self.last_good_state()
            raise TWNError(f"{error}; training stopped, the last good state is {last or 'none (no checkpoint yet)'}") from None

    def after_step(self, model, trainer, metrics: dict, *, total_steps: int, log_every: int, checkpoint_every: int, stages: list[dict]) -> None:
        """Log the step and, every `checkpoint_every` steps and at the end, save a resumable state."""
        from twn_cli.engine.checkpoint import save_checkpoint

        step = trainer.step_done
        if step % log_every == 0 or step == total_steps:
            self.log(metrics)
        if step % checkpoint_every == 0 or step == total_steps:
            save_checkpoint(
                model, self.state_path(step), stages=stages,
                write_files=lambda staging: save_trainer_state(staging, trainer.state_dict()),
            )
            self.prune()

    def prune(self) -> None:
        states = sorted(p for p in self.states_dir.iterdir() if re.fullmatch(r"step-\d+", p.name))
        for old in states[: -self.keep_states]:
            shutil.rmtree(old, ignore_errors=True)


def claim_run_directory(
    run_dir: str | Path, *, resume: bool = False, first_process: bool = True, training_states: bool = True
) -> OutputLock | None:
    """Before any work: lock `run_dir` against a second writer (in the first process only: the others are
    this run's own) and check that it may take this run (`RunDirectory.check`; for a stage that keeps no
    `training_states`, only that it is a checkpoint or a run's folder). Hold the lock until the end."""
    from twn_cli.engine.checkpoint import check_checkpoint_output

    lock = lock_output(run_dir) if first_process else None
    try:
        if training_states:
            RunDirectory(run_dir).check(resume)
        else:
            check_checkpoint_output(Path(run_dir))
    except TWNError:
        if lock is not None:
            lock.release()
        raise
    return lock


def finite_optimizer_step(optimizer, groups: list[list[torch.Tensor]], max_grad_norm: float, step: int) -> float:
    """Clip each group's gradient to `max_grad_norm` on its own and take the optimiser step; returns the norm of
    the whole gradient before clipping.

    Groups are the parts that separate losses train (the two adapters): one norm over both would let the SFT
    gradient scale the embedding adapter's steps. A NaN or inf gradient norm raises FloatingPointError before
    the step, so it is never taken; weights that the step made non-finite raise it after, and training stops
    before they reach any saved state.
    """
    norm = math.hypot(*(float(torch.nn.utils.clip_grad_norm_(group, max_grad_norm)) for group in groups))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient norm became {norm} at step {step} (the step was not taken)")
    optimizer.step()
    parameters = [parameter for group in groups for parameter in group]
    broken = sum(int((~torch.isfinite(parameter.detach())).sum()) for parameter in parameters)
    if broken:
        raise FloatingPointError(f"step {step} made {broken} weights non-finite")
    return norm


def save_trainer_state(directory: Path, state: dict) -> None:
    torch.save(state, directory / TRAINER_STATE)


def load_trainer_state(state_dir: Path) -> dict:
    try:
        return torch.load(state_dir / TRAINER_STATE, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError and others for such files
        raise TWNError(f"state '{state_dir}': {TRAINER_STATE} is not a plain tensor file (refused to load: {torch_load_refusal(error)})") from None



def resume_latest_state(run: RunDirectory, model, trainer, config, *, main_process: bool = True, fixed: Sequence[str] = ()) -> None:
    """Load the run's newest state into `model` and `trainer` (which has `load_state_dict` and `step_done`).

    A changed setting is a warning, but for the `fixed` ones, which the run's state depends on: those refuse
    to resume (one a state predates counts with its default)."""
    from dataclasses import asdict, fields

    from twn_cli.engine.checkpoint import load_trained_weights

    latest = run.latest_state()
    if latest is None:
        raise TWNError(f"nothing to resume in '{run.run_dir}': it holds no training state")
    state = load_trainer_state(latest)
    defaults = {field.name: field.default for field in fields(config)}
    for key in fixed:
        saved = state["config"].get(key, defaults[key])
        if getattr(config, key) != saved:
            raise TWNError(f"the run in '{run.run_dir}' was trained with {key}: {saved}, not {getattr(config, key)}: "
                           "resume with the same setting, or start a new run")
    load_trained_weights(model, latest)
    changed = sorted(key for key, value in asdict(config).items() if state["config"].get(key) != value)
    if changed:
        log.warning("resuming with changed settings (%s): the run will not match an uninterrupted one", ", ".join(changed))
    trainer.load_state_dict(state)
    if main_process:
        run.truncate_log(trainer.step_done)
    log.info("resumed from %s at step %d", latest, trainer.step_done)
