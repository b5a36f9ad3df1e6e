"""The MMEB-V2 task registry: the one table that `twn prepare mmeb-v2`, `twn eval` and the report read.

MMEB-V2 has 78 tasks in 9 meta-tasks: 36 image tasks (classification, VQA, retrieval, grounding), 18 video
tasks (classification, QA, retrieval, moment retrieval) and 24 visual-document retrieval tasks. Each task
names where its files lie under the benchmark root (as the maintainers distribute them: the image-task
parquet and the frames of TIGER-Lab/MMEB-V2, and one local copy per hub annotation dataset), the reader of
its layout, how its candidates are pooled, its published query and target instructions, and the
leaderboard column it counts in. The names, files, instructions, pools and groups follow the VLM2Vec
evaluation code (experiments/public/eval/*.yaml, src/data/eval_dataset/*, experiments/report_score_v2.py);
docs/mmeb-v2.md lists the sources.

Scores: Hit@1 for image and video tasks, NDCG@5 (linear gain) for visual documents; every average (overall,
modality, meta-task, leaderboard column) is a mean over its tasks.

The meta-task and modality tables here are also the prepared-dataset schema's (`twn_cli.data.prepared`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Each meta-task belongs to one modality; the modality picks the headline metric.
MODALITY_OF_META_TASK = {
    "classification": "image",
    "vqa": "image",
    "retrieval": "image",
    "grounding": "image",
    "video_classification": "video",
    "video_qa": "video",
    "video_retrieval": "video",
    "moment_retrieval": "video",
    "visdoc": "visdoc",
}
HEADLINE_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg@5"}
MODALITIES = ("image", "video", "visdoc")
MODALITY_LABELS = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}
# The leaderboard's column of each image and video meta-task; visual documents are grouped by family instead.
GROUP_OF_META_TASK = {
    "classification": "I-CLS",
    "vqa": "I-QA",
    "retrieval": "I-RET",
    "grounding": "I-VG",
    "video_classification": "V-CLS",
    "video_qa": "V-QA",
    "video_retrieval": "V-RET",
    "moment_retrieval": "V-MRET",
}

VIDEO_TARGET = "Understand the content of the provided video."
VIDEO_QA_PROMPT = (
    "Given a video and a question, select the most accurate answer from the provided candidates. "
    "Return only the exact text of your chosen answer. Question:"
)
DOCUMENT_QUERY = "Find a document image that matches the given query:"
DOCUMENT_TARGET = "Understand the content of the provided document image."


@dataclass(frozen=True)
class MMEBTask:
    """One MMEB-V2 task: what it is, where its files lie under the root, and how to read and score it.

    `layout` names the reader (`twn_cli.data.mmeb_v2_sources`). `data` is the folder of its annotation
    files (parquet or JSONL, as the hub stores them), a copy of the hub dataset `hub`; `config` is the
    sub-folder of a hub config and `split` the split they hold. `media` is the folder its images, frame
    folders or pages resolve against. `query_instruction` / `target_instruction`: the published
    instructions; None where the data carries its own (the image tasks' `qry_inst` / `tgt_inst` columns)
    or where a side has none (a label, an answer). `query_instructions_by_input` replaces the query
    instruction for a query with an image or a video (MomentSeeker).
    """

    name: str
    meta_task: str
    layout: str
    pool: str  # "per_query": each query ranks its own candidates; "global": the task's whole pool
    data: str
    split: str
    media: str
    config: str | None = None
    query_instruction: str | None = None
    target_instruction: str | None = None
    query_instructions_by_input: tuple[tuple[str, str], ...] = ()
    hub: str = ""  # the hub dataset whose copy `data` is
    group: str = ""  # the leaderboard column; default: the meta-task's
    aliases: tuple[str, ...] = ()  # other spellings (MMEB-train's, the hub dataset's)

    @property
    def modality(self) -> str:
        return MODALITY_OF_META_TASK[self.meta_task]

    @property
    def metric(self) -> str:
        return HEADLINE_METRIC[self.modality]

    @property
    def column(self) -> str:
        return self.group or GROUP_OF_META_TASK[self.meta_task]

    def query_instruction_for(self, given_input: str) -> str | None:
        """The query instruction for a query whose visual input is `given_input` ("text", "image", "video")."""
        return dict(self.query_instructions_by_input).get(given_input, self.query_instruction)


def _image(name: str, meta_task: str) -> MMEBTask:
    # The hub's eval parquet (a config folder per task) and the images of MMEB-V2's image-tasks archive.
    return MMEBTask(name, meta_task, "mmeb-image", "per_query", f"image-tasks/{name}", "test", "image-tasks",
                    hub="ziyjiang/MMEB_Test_Instruct")


def _video(name, meta_task, layout, pool, data, frames, query, *, target=None, split="test", config=None,
           hub_owner="VLM2Vec", **more):
    return MMEBTask(
        name, meta_task, layout, pool, f"video-tasks/{data}", split, f"video-tasks/frames/{frames}",
        config=config, query_instruction=query, target_instruction=target, hub=f"{hub_owner}/{data}", **more,
    )


def _document(name: str, group: str, hub: str, pages: str, layout: str = "vidore", split: str = "test") -> MMEBTask:
    return MMEBTask(
        name, "visdoc", layout, "global", f"visdoc-tasks/{hub.split('/')[1]}", split, f"visdoc-tasks/{pages}",
        config="queries", query_instruction=DOCUMENT_QUERY, target_instruction=DOCUMENT_TARGET, hub=hub, group=group,
    )


_CLASSIFICATION = ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                   "ImageNet-R", "ObjectNet", "Country211")
_VQA = ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
        "TextVQA")
_RETRIEVAL = ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
              "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")
_GROUNDING = ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")

_VIDORE_V1 = {  # task -> hub dataset (vidore/<name>)
    "ViDoRe_arxivqa": "arxivqa_test_subsampled_beir",
    "ViDoRe_docvqa": "docvqa_test_subsampled_beir",
    "ViDoRe_infovqa": "infovqa_test_subsampled_beir",
    "ViDoRe_tabfquad": "tabfquad_test_subsampled_beir",
    "ViDoRe_tatdqa": "tatdqa_test_beir",
    "ViDoRe_shiftproject": "shiftproject_test_beir",
    **{
        f"ViDoRe_syntheticDocQA_{topic}": f"syntheticDocQA_{topic}_test_beir"
        for topic in ("artificial_intelligence", "energy", "government_reports", "healthcare_industry")
    },
}
_VIDORE_V2 = {  # task -> (hub dataset vidore/<name>, page folder); all queries, every language
    "ViDoRe_esg_reports_human_labeled_v2": ("esg_reports_human_labeled_v2", "esg_reports_human_labeled_v2"),
    "ViDoRe_biomedical_lectures_v2_multilingual": ("biomedical_lectures_v2", "biomedical_lectures_v2_multilingual"),
    "ViDoRe_economics_reports_v2_multilingual": ("economics_reports_v2", "economics_reports_v2_multilingual"),
    "ViDoRe_esg_reports_v2_multilingual": ("esg_reports_v2", "esg_reports_v2_multilingual"),
}
_VISRAG = ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")  # openbmb/VisRAG-Ret-Test-<name>
_VISDOC_OOD = {  # task -> hub dataset VLM2Vec/<name>
    "ViDoSeek-page": "ViDoSeek-page-fixed",
    "ViDoSeek-doc": "ViDoSeek",
    "MMLongBench-page": "MMLongBench-page-fixed",
    "MMLongBench-doc": "MMLongBench-doc",
}

TASKS: tuple[MMEBTask, ...] = (
    *(_image(name, "classification") for name in _CLASSIFICATION),
    *(_image(name, "vqa") for name in _VQA),
    *(_image(name, "retrieval") for name in _RETRIEVAL),
    *(_image(name, "grounding") for name in _GROUNDING),
    # Video classification: the frames of each clip against the dataset's class names (SSv2: its own choices).
    _video("K700", "video_classification", "video-classification", "global", "Kinetics-700", "video_cls/K700",
           "Recognize the category of the video content.", aliases=("Kinetics-700",)),
    _video("SmthSmthV2", "video_classification", "ssv2", "per_query", "SmthSmthV2", "video_cls/SSv2",
           "What actions or object interactions are being performed by the person in the video?",
           aliases=("SSv2",)),
    _video("HMDB51", "video_classification", "video-classification", "global", "HMDB51", "video_cls/HMDB51",
           "What actions or objects interactions are the person in the video doing?"),
    _video("UCF101", "video_classification", "video-classification", "global", "UCF101", "video_cls/UCF101",
           "What activities or sports are being performed by the person in the video?"),
    _video("Breakfast", "video_classification", "video-classification", "global", "Breakfast",
           "video_cls/Breakfast", "Recognize the breakfast type that the person is cooking in the video. "),
    # Video QA: the question (with its options) about the frames, against the answer options.
    _video("MVBench", "video_qa", "mvbench", "per_query", "MVBench", "video_qa/MVBench", VIDEO_QA_PROMPT,
           split="train"),
    _video("Video-MME", "video_qa", "videomme", "per_query", "Video-MME", "video_qa/Video-MME", VIDEO_QA_PROMPT),
    _video("NExTQA", "video_qa", "nextqa", "per_query", "NExTQA", "video_qa/NExTQA", VIDEO_QA_PROMPT, config="MC"),
    _video("EgoSchema", "video_qa", "egoschema", "per_query", "EgoSchema", "video_qa/EgoSchema", VIDEO_QA_PROMPT,
           config="Subset"),
    _video("ActivityNetQA", "video_qa", "activitynetqa", "per_query", "ActivityNetQA", "video_qa/ActivityNetQA",
           VIDEO_QA_PROMPT),
    # Video retrieval: a caption against every video of the dataset.
    _video("DiDeMo", "video_retrieval", "didemo", "global", "DiDeMo", "video_ret/DiDeMo",
           "Find a video that includes the following described scenes:", target=VIDEO_TARGET),
    _video("MSR-VTT", "video_retrieval", "msrvtt", "global", "MSR-VTT", "video_ret/MSR-VTT",
           "Find a video that contains the following visual content:", target=VIDEO_TARGET, config="test_1k"),
    _video("MSVD", "video_retrieval", "msvd", "global", "MSVD", "video_ret/MSVD",
           "Find the video snippet that corresponds to the given summary:", target=VIDEO_TARGET),
    _video("VATEX", "video_retrieval", "vatex", "global", "VATEX", "video_ret/VATEX",
           "Select a video that fits the description provided:", target=VIDEO_TARGET),
    _video("YouCook2", "video_retrieval", "youcook2", "global", "YouCook2", "video_ret/YouCook2",
           "Find a video that demonstrates the following action while making a recipe:", target=VIDEO_TARGET,
           split="val", hub_owner="lmms-lab"),
    # Moment retrieval: a description (and the whole video) against the clips cut from that video.
    _video("QVHighlight", "moment_retrieval", "moment-retrieval", "per_query", "QVHighlight",
           "video_mret/QVHighlight", "Find the clip that corresponds to the described scene in the given video:",
           target=VIDEO_TARGET),
    _video("Charades-STA", "moment_retrieval", "moment-retrieval", "per_query", "Charades-STA",
           "video_mret/Charades_STA", "Find the clip that corresponds to the described scene in the given video:",
           target=VIDEO_TARGET),
    _video("MomentSeeker", "moment_retrieval", "momentseeker", "per_query", "MomentSeeker", "video_mret/MomentSeeker",
           "Find the clip that corresponds to the given text:",
           target="Understand the content of the provided video clip.",
           query_instructions_by_input=(
               ("image", "Select the video clip that aligns with the given text and image:"),
               ("video", "Find the clip that corresponds to the given sentence and video segment:"),
           )),
    # Visual documents: a question against every page of the corpus, graded qrels, BEIR layout.
    *(_document(name, "ViDoRe-V1", f"vidore/{data}", name) for name, data in _VIDORE_V1.items()),
    *(_document(name, "ViDoRe-V2", f"vidore/{data}", pages) for name, (data, pages) in _VIDORE_V2.items()),
    *(_document(f"VisRAG_{name}", "VisRAG", f"openbmb/VisRAG-Ret-Test-{name}", f"VisRAG_{name}", "visrag", "train")
      for name in _VISRAG),
    *(_document(name, "VisDoc-OOD", f"VLM2Vec/{data}", name) for name, data in _VISDOC_OOD.items()),
)
TASK_BY_NAME = {task.name: task for task in TASKS}
# The leaderboard's columns, in its order: overall, the three modalities, then the groups of each.
GROUPS = tuple(dict.fromkeys(task.column for task in TASKS))


def _task_key(name: str) -> str:
    # MMEB-train and MMEB-eval spell the same task differently (ImageNet_1K / ImageNet-1K).
    return re.sub(r"[-_\s]", "", name).lower()


_TASK_BY_KEY = {_task_key(spelling): task for task in TASKS for spelling in (task.name, *task.aliases)}
# Visual-document tasks outside the 78 come in the same families (ViDoRe_*, VisRAG_*, ...).
_VISDOC_PREFIXES = ("vidore", "visrag", "vidoseek", "mmlongbench")


def find_task(name: str) -> MMEBTask | None:
    """The MMEB-V2 task of a name in any of its spellings, or None."""
    return _TASK_BY_KEY.get(_task_key(name))


def mmeb_meta_task(task: str) -> str | None:
    """The MMEB-V2 meta-task of a task name (in any MMEB spelling), or None for a task MMEB does not have."""
    found = find_task(task)
    if found is not None:
        return found.meta_task
    return "visdoc" if _task_key(task).startswith(_VISDOC_PREFIXES) else None


def select_tasks(names: Iterable[str] | None) -> list[MMEBTask]:
    """The registry's tasks named in `names` (any spelling; a modality or leaderboard column names all of
    its tasks), in registry order; every task when `names` is None. Unknown names are a ValueError."""
    if names is None:
        return list(TASKS)
    wanted: set[str] = set()
    for name in names:
        members = [task for task in TASKS if name in (task.modality, task.column, task.meta_task)]
        if not members:
            found = find_task(name)
            if found is None:
                raise ValueError(f"'{name}' is not an MMEB-V2 task, modality or leaderboard column")
            members = [found]
        wanted.update(task.name for task in members)
    return [task for task in TASKS if task.name in wanted]
