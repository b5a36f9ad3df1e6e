"""Videos in records: frame folders, frame lists and video files, sampled once into a clip, in prepared rows and
in the inputs of embed and route; datasets prepared before videos had a column of their own still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from twn_cli.data.inputs import read_inputs
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.data.videos import VideoClip, sample_clip, uniform_indices
from twn_cli.errors import BadRecordError
from twn_cli.stages.prepare import run_prepare


def write_frames(folder: Path, picture: Path, count: int, size=(48, 40)) -> Path:
    folder.mkdir(parents=True)
    image = Image.open(picture).convert("RGB")
    for index in range(1, count + 1):
        image.crop((index * 9, 0, index * 9 + 200, 160)).resize(size).save(folder / f"frame_{index}.png")
    return folder


def write_mp4(path: Path, picture: Path, count: int, fps: int = 4) -> Path:
    import av

    image = Image.open(picture).convert("RGB")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(count):
            frame = np.asarray(image.crop((index * 9, 0, index * 9 + 200, 150)).resize((64, 48)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def prepare(source: Path, output: Path, **options):
    settings = dict(skip_bad=False, cot_column=None, instruction=None, split=None)
    return run_prepare(str(source), output, **{**settings, **options})


@pytest.mark.parametrize("total, count, expected", [(20, 4, [2, 7, 12, 17]), (3, 8, [0, 1, 2]), (8, 8, list(range(8)))])
def test_frames_are_the_middles_of_equal_segments(total, count, expected):
    assert uniform_indices(total, count) == expected


def test_a_frame_folder_is_sampled_in_natural_order_and_opens_as_a_video(tmp_path, real_image_paths):
    folder = write_frames(tmp_path / "clip", real_image_paths[0], 12)
    clip = sample_clip(folder, 4, fps=6)
    assert [Path(path).name for path in clip.paths] == ["frame_2.png", "frame_5.png", "frame_8.png", "frame_11.png"]
    assert (clip.frame_indices, clip.total_frames, clip.fps) == ((1, 4, 7, 10), 12, 6)
    video = clip.load()
    assert len(video.frames) == 4 and video.metadata()["frames_indices"] == [1, 4, 7, 10]
    assert VideoClip.from_row(clip.to_row()) == clip


def test_a_video_file_is_decoded_at_the_sampled_frames(tmp_path, real_image_paths):
    path = write_mp4(tmp_path / "clip.mp4", real_image_paths[0], count=12, fps=4)
    clip = sample_clip(path, 4)
    assert (clip.paths, clip.frame_indices, clip.total_frames, clip.fps) == ((str(path),), (1, 4, 7, 10), 12, 4.0)
    video = clip.load()
    assert [frame.size for frame in video.frames] == [(64, 48)] * 4
    assert video.metadata()["fps"] == 4.0


@pytest.mark.parametrize("make, reason", [
    (lambda root, picture: write_frames(root / "one", picture, 1), "a video needs at least 2 frames"),
    (lambda root, picture: root / "missing", "is neither a folder of frames nor a video file"),
    (lambda root, picture: (root / "empty").mkdir() or root / "empty", "has no frame images"),
    (lambda root, picture: (root / "broken.mp4").write_bytes(b"not a video") and root / "broken.mp4", "cannot be decoded"),
])
def test_an_unusable_video_is_named_with_what_is_wrong(tmp_path, real_image_paths, make, reason):
    with pytest.raises(ValueError, match=reason):
        sample_clip(make(tmp_path, real_image_paths[0]), 4)


def test_frames_of_different_sizes_are_refused(tmp_path, real_image_paths):
    folder = write_frames(tmp_path / "clip", real_image_paths[0], 3)
    Image.new("RGB", (10, 10)).save(folder / "frame_2.png")
    with pytest.raises(ValueError, match="frames differ in size"):
        sample_clip(folder, 3).load()


def test_records_give_videos_as_folders_lists_files_or_folders_among_their_images(tmp_path, real_image_paths):
    folder = write_frames(tmp_path / "clips" / "a", real_image_paths[0], 10)
    write_mp4(tmp_path / "clips" / "b.mp4", real_image_paths[1], count=8)
    frames = sorted(path.name for path in folder.iterdir())
    lines = [
        {"id": "folder", "video": "clips/a", "num_frames": 2, "fps": 5},
        {"id": "list", "video": [f"clips/a/{name}" for name in frames[:3]], "text": "three frames"},
        {"id": "file", "video": "clips/b.mp4"},
        {"id": "in-images", "images": [str(real_image_paths[2]), "clips/a"]},
        {"id": "two", "video": "clips/a", "image": "clips/b.mp4"},
        {"id": "one-frame", "video": [f"clips/a/{frames[0]}"]},
        {"id": "bad-count", "video": "clips/a", "num_frames": "four"},
    ]
    source = tmp_path / "inputs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = {record.id: record for record in read_inputs(str(source), frames=3)}
    assert [len(records[name].video.paths) for name in ("folder", "list", "in-images")] == [2, 3, 3]
    assert records["folder"].video.fps == 5 and records["file"].video.is_file
    assert records["in-images"].image_paths == [real_image_paths[2]]
    loaded = records["in-images"].load()
    assert len(loaded.images) == 1 and len(loaded.video.frames) == 3
    for name, reason in (("two", "one video, not 2"), ("one-frame", "at least 2 frames"), ("bad-count", "whole number")):
        with pytest.raises(BadRecordError, match=reason):
            records[name].load()


def test_prepare_stores_a_video_as_its_clip_and_training_inputs_open_it(tmp_path, real_image_paths):
    write_frames(tmp_path / "clips" / "a", real_image_paths[0], 10)
    write_mp4(tmp_path / "clips" / "b.mp4", real_image_paths[1], count=8, fps=8)
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in [
        {"id": "frames", "query_image": "clips/a", "pos_text": "a panning shot"},
        {"id": "file", "query_text": "a cat", "pos_image": "clips/b.mp4"},
    ]))
    prepare(source, tmp_path / "out", frames=4)
    dataset = load_prepared(tmp_path / "out")
    rows = {row["id"]: row for row in dataset.queries["train"]}
    assert rows["frames"]["video"]["frame_indices"] == [1, 3, 6, 8] and rows["frames"]["images"] == []
    target = next(row for row in dataset.candidates if row["video"]["paths"])
    assert target["video"] == {"paths": [str(tmp_path / "clips" / "b.mp4")], "frame_indices": [1, 3, 5, 7], "total_frames": 8, "fps": 8.0}
    assert len(prepared_input(target).video.frames) == 4
    assert dataset.manifest["tasks"]["records"]["modality"] == "video"


def test_a_dataset_prepared_before_videos_had_a_column_still_reads(tmp_path, real_image_paths):
    source = tmp_path / "records.jsonl"
    source.write_text(json.dumps({"id": "q", "query_text": "a cat", "pos_image": str(real_image_paths[1])}) + "\n")
    prepare(source, tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    for table in ("queries", "candidates"):
        loaded = datasets.load_from_disk(str(tmp_path / "new" / table))
        shutil.rmtree(old / table)
        loaded.remove_columns("video").save_to_disk(str(old / table))
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    dataset = load_prepared(old)
    assert dataset.queries["train"][0]["video"]["paths"] == [] and dataset.candidates[0]["video"]["paths"] == []
    assert prepared_input(dataset.candidates[0]).video is None and len(prepared_input(dataset.candidates[0]).images) == 1
    assert dataset.with_copies([dataset.candidates[0]["id"]]) == {dataset.candidates[0]["id"]}
