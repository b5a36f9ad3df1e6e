"""Teacher chain of thought: a teacher MLLM reasons, briefly, about what each query is looking for.

Generation is greedy and batched, and resumable: every finished batch is appended to a JSONL cache (flushed
and fsynced), so an interruption loses at most the batch in flight and a rerun generates only what the
cache lacks. Each cache line carries a key of the teacher, the settings and the query's prompt and pictures,
so a cache written for another teacher, other settings or an edited query is never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twn_cli.data.images import load_image
from twn_cli.data.videos import VideoClip
from twn_cli.engine.user_text import UserText
from twn_cli.errors import TWNError

if TYPE_CHECKING:  # torch and transformers load only when a teacher runs
    from twn_cli.engine.backbone import Backbone

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "Search query:\n{query}\n\n"
    "Think step by step, briefly, about what this query is looking for and what a matching result must "
    "show or say."
)


@dataclass(frozen=True)
class _Request:
    """One query the teacher has to reason about."""

    id: str
    prompt: str  # after the teacher's chat template, with its image and video placeholders
    images: tuple[str, ...]
    video: VideoClip | None
    key: str  # what the cached CoT must have been generated from to be reused


def generate_teacher_cots(
    records: Iterable[Mapping],
    teacher: Backbone,
    cache_path: Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Teacher CoTs ({id: cot}) for the `records` (prepared query rows) whose `cot` is empty.

    CoTs already in `cache_path` for the same query, teacher and settings are reused; the others are
    generated `batch_size` queries at a time (greedy, at most `max_new_tokens` each) and appended to the
    cache. `prompt_template` holds `{query}` (the instruction and text). `progress(done, total)` is told
    after reading the cache and after every batch.
    """
    check_generation_limits(batch_size, max_new_tokens)
    _check_template(prompt_template)
    positions = getattr(teacher.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    user_text = UserText(teacher.tokenizer, positions)
    cache_path = Path(cache_path)
    requests = [
        _request(record, teacher, prompt_template, max_new_tokens, user_text) for record in records if not record["cot"]
    ]
    cached = _read_cache(cache_path)
    cots = {
        request.id: cached[request.id][1]
        for request in requests
        if request.id in cached and cached[request.id][0] == request.key
    }
    missing = [request for request in requests if request.id not in cots]
    logger.info(
        "teacher CoT for %d queries: %d from %s, %d to generate with %s",
        len(requests), len(cots), cache_path, len(missing), teacher.source,
    )
    if progress is not None:
        progress(len(cots), len(requests))
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        texts = _generate(teacher, batch, max_new_tokens)
        entries = [{"id": request.id, "cot": text, "key": request.key} for request, text in zip(batch, texts)]
        _append_to_cache(cache_path, entries)
        cots.update((request.id, text) for request, text in zip(batch, texts))
        if progress is not None:
            progress(len(cots), len(requests))
    return {request.id: cots[request.id] for request in requests}


def check_generation_limits(batch_size: int, max_new_tokens: int) -> None:
    """A TWNError unless both are at least 1."""
    if batch_size < 1 or max_new_tokens < 1:
        raise TWNError(
            f"teacher batch size and max new tokens must be at least 1, not {batch_size} and {max_new_tokens}"
        )


def _check_template(template: str) -> None:
    try:
        filled = template.format(query="\0")
    except (KeyError, IndexError, ValueError):
        filled = ""
    if "\0" not in filled:
        raise TWNError(
            "the teacher prompt template must hold {query} and no other {placeholder} (write {{ }} for braces)"
        )


def _request(record: Mapping, teacher: Backbone, template: str, max_new_tokens: int, user_text: UserText) -> _Request:
    query = user_text("\n".join(part for part in (record["instruction"], record["text"]) if part), max_new_tokens)
    video = VideoClip.from_row(record.get("video"))
    content = [{"type": "image"} for _ in record["images"]] + [{"type": "video"}] * (video is not None)
    content.append({"type": "text", "text": template.format(query=query)})
    prompt = teacher.processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    identity = {
        "teacher": teacher.source,
        "fingerprint": teacher.fingerprint,
        "max_new_tokens": max_new_tokens,
        "prompt": prompt,
        "images": list(record["images"]),
    }
    if video is not None:
        identity["video"] = video.to_row()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return _Request(id=record["id"], prompt=prompt, images=tuple(record["images"]), video=video, key=key)


def _generate(teacher: Backbone, batch: list[_Request], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the batch's prompts: only the new tokens, decoded and stripped."""
    import torch

    from twn_cli.engine.processors import process

    images, videos = [], []
    for request in batch:
        try:
            for path in request.images:
                try:
                    images.append(load_image(path))
                except ValueError as problem:
                    raise ValueError(f"image '{path}' {problem}") from None
            if request.video is not None:
                videos.append(request.video.load())
        except ValueError as problem:
            raise TWNError(f"query '{request.id}': {problem}") from None
    # Left-padded: generation continues every row from the same last position.
    encoded = process(teacher.processor, [request.prompt for request in batch], images, videos, padding_side="left")
    encoded = {name: value.to(teacher.device) for name, value in encoded.items()}
    for name, value in encoded.items():
        if value.is_floating_point():
            encoded[name] = value.to(teacher.dtype)
    tokenizer = teacher.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        # Sampling settings of the teacher's generation config are cleared: greedy needs none of them.
        output = teacher.model.generate(
            **encoded,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
        )
    new_tokens = output[:, encoded["input_ids"].shape[1] :]
    return [text.strip() for text in teacher.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _read_cache(path: Path) -> dict[str, tuple[str, str]]:
    """{id: (key, cot)} of the cache; a last line without its newline (an interrupted write) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        logger.warning("ignoring the half-written last line of %s", path)
        # Cut off, so that the next append starts on a line of its own.
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    entries = {}
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[str(entry["id"])] = (str(entry["key"]), str(entry["cot"]))
        except (ValueError, KeyError, TypeError):
            raise TWNError(
                f"teacher CoT cache '{path}' line {number} is corrupt; delete the file to start afresh"
            ) from None
    return entries


def _append_to_cache(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(entry) + "\n" for entry in entries))
        handle.flush()
        os.fsync(handle.fileno())
