"""Benchmark prompts: MT-Bench, HumanEval and GSM8K, from a local file or from the Hugging Face Hub, and a user's
own prompts from a local file.

Local files are the upstream formats: MT-Bench `question.jsonl` (question_id, category, turns), HumanEval
`HumanEval.jsonl.gz` (gzip'd JSONL, prompt) and GSM8K `test.jsonl` (question), read by the package's JSON Lines
reader (gzip or not, whatever the name): every problem is reported with the file and the line it is on. The
`prompts` dataset is any JSON Lines file with a `prompt` string on each line (a `lookahead generate
--prompts-file` file, or the repository's `prompts/other_kinds.jsonl`), each sent as one user turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import JsonLinesError, read_objects


@dataclass(frozen=True)
class Prompt:
    dataset: str
    index: int  # position among the dataset's records (0-based)
    text: str
    chat: bool  # wrap the text as one user turn in the model's chat template


def _field(record: dict, field: str):
    if field not in record:
        raise KeyError(f"missing field {field!r}")
    return record[field]


def _nonblank(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_field(field: str) -> Callable[[dict], str]:
    """Reads a record's prompt from a string field."""

    def extract(record: dict) -> str:
        value = _field(record, field)
        if not _nonblank(value):
            raise KeyError(f"field {field!r} must be a non-empty string")
        return value

    return extract


def _first_turn(field: str) -> Callable[[dict], str]:
    """Reads a record's prompt as the first of a list of conversation turns."""

    def extract(record: dict) -> str:
        turns = _field(record, field)
        if not isinstance(turns, list) or not turns or not _nonblank(turns[0]):
            raise KeyError(f"field {field!r} must be a list of turns whose first is a non-empty string")
        return turns[0]

    return extract


@dataclass(frozen=True)
class DatasetSpec:
    chat: bool  # prompts go through the chat template
    from_file: Callable[[dict], str]  # record of the upstream file -> prompt text
    hub_name: str | None = None  # None: local files only (and no split or reader either)
    hub_split: str | None = None
    from_hub: Callable[[dict], str] | None = None  # record of the Hub dataset -> prompt text
    hub_config: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mtbench": DatasetSpec(
        chat=True, from_file=_first_turn("turns"),
        hub_name="HuggingFaceH4/mt_bench_prompts", hub_split="train", from_hub=_first_turn("prompt"),
    ),
    "humaneval": DatasetSpec(
        chat=False, from_file=_text_field("prompt"),
        hub_name="openai/openai_humaneval", hub_split="test", from_hub=_text_field("prompt"),
    ),
    "gsm8k": DatasetSpec(
        chat=True, from_file=_text_field("question"),
        hub_name="openai/gsm8k", hub_split="test", from_hub=_text_field("question"), hub_config="main",
    ),
    "prompts": DatasetSpec(chat=True, from_file=_text_field("prompt")),
}


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _collect(dataset: str, records: Iterable[tuple[int, dict]], extract, error: Callable[[int, str], ValueError],
             limit: int | None, source: str) -> list[Prompt]:
    """The prompts of (place, record) pairs; `error(place, problem)` is the error for a record without one."""
    prompts = []
    for index, (place, record) in enumerate(records):
        try:
            text = extract(record)
        except KeyError as err:
            raise error(place, err.args[0]) from None
        prompts.append(Prompt(dataset, index, text, DATASETS[dataset].chat))
        if len(prompts) == limit:  # stop before reading (and checking) any further line
            break
    if not prompts:
        raise ValueError(f"{source}: no prompts found")
    return prompts


def load_file(dataset: str, path: str | Path, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts (all when None) of `dataset` from a local file in its upstream format."""
    spec = _spec(dataset)
    _check_limit(limit)
    error = lambda line, problem: JsonLinesError(path, line, problem)  # noqa: E731
    return _collect(dataset, read_objects(path), spec.from_file, error, limit, str(path))


def load_hub(dataset: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts of `dataset` downloaded through the `datasets` library (imported only here)."""
    spec = _spec(dataset)
    _check_limit(limit)
    if spec.hub_name is None:
        raise ValueError(f"the {dataset!r} dataset is a local file of your own: pass --data-file PATH (JSON Lines, "
                         'a "prompt" string on each line)')
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading {dataset!r} from the Hugging Face Hub needs the 'datasets' package, which is not installed: "
            "run `pip install datasets` (or `pip install lookahead-decoding[datasets]`), or pass --data-file PATH"
        ) from err
    split = spec.hub_split if limit is None else f"{spec.hub_split}[:{limit}]"
    rows = datasets.load_dataset(spec.hub_name, spec.hub_config, split=split)
    error = lambda i, problem: ValueError(f"{spec.hub_name} ({spec.hub_split}) record {i}: {problem}")  # noqa: E731
    return _collect(dataset, enumerate(rows), spec.from_hub, error, limit, spec.hub_name)


def load_prompts(dataset: str, data_file: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of `dataset` from `data_file` when given, otherwise from the Hub."""
    if data_file is not None:
        return load_file(dataset, data_file, limit)
    return load_hub(dataset, limit)
