"""LLaMA-Factory's `dataset_info.json` read into our sources (`data.dataset_info=PATH data.datasets=[names]`).

An entry maps to one SourceConfig named after it:

| dataset_info.json                        | source                                                          |
|------------------------------------------|-----------------------------------------------------------------|
| `file_name` (a file or a folder)         | `path`, relative to the json's folder (a folder: all its files)   |
| `hf_hub_url`, `subset`, `split`          | `hf_id`, `hf_name`, `split` (default train)                     |
| `num_samples`                            | `count` (rows drawn into the mix)                               |
| `formatting: alpaca` (default)           | `format: alpaca`; `columns` prompt/query/response/history/system/tools -> `fields` instruction/input/output/history/system/tools |
| `formatting: sharegpt`                   | `format: sharegpt`; `columns` messages/system/tools -> `fields` conversations/system/tools; `tags` role_tag/content_tag -> `fields` from/value, user_tag/assistant_tag/observation_tag/function_tag/system_tag -> `role_map` |

Columns LLaMA-Factory leaves unset by default (alpaca `history`, `system`, `tools`) are left unread here
too, as are the other format's columns and an alpaca entry's `tags`, which it does not use either. `ms_hub_url` and `om_hub_url` beside an `hf_hub_url` are ignored (the Hugging Face hub is used);
`file_sha1` is ignored. Refused, with the entry and key named: preference and KTO data (`ranking`,
`chosen`, `rejected`, `kto_tag`), images, videos and audios (the model reads text), and what has no
source equivalent (`script_url`, `cloud_file_name`, hub `folder`, an entry with only `ms_hub_url` or
`om_hub_url`, another `formatting`, a key LLaMA-Factory does not define).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ouro_train.config import Format, SourceConfig
from ouro_train.data.validate import DataError

ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1",
              "subset", "split", "folder", "num_samples", "ranking", "formatting", "columns", "tags"}
UNSUPPORTED = {
    "script_url": "dataset loading scripts are not run; point file_name at the data files",
    "cloud_file_name": "cloud storage is not read; download the file and use file_name",
    "folder": "a hub folder is not mapped; list its files in a source's data_files instead",
}
TEXT_ONLY = {"images": "images", "videos": "videos", "audios": "audio"}
PREFERENCE = ("chosen", "rejected", "kto_tag")
# LLaMA-Factory column -> our field, per format (its defaults as the values where it has one)
ALPACA_COLUMNS = {"prompt": ("instruction", "instruction"), "query": ("input", "input"),
                  "response": ("output", "output"), "history": ("history", None), "system": ("system", None),
                  "tools": ("tools", None)}
SHAREGPT_COLUMNS = {"messages": ("conversations", "conversations"), "system": ("system", None), "tools": ("tools", None)}
ROLE_TAGS = {"user_tag": ("human", "user"), "assistant_tag": ("gpt", "assistant"), "observation_tag": ("observation", "tool"),
             "function_tag": ("function_call", "assistant"), "system_tag": ("system", "system")}


def dataset_info_sources(path: str | None, names: Sequence[str], at: str) -> list[SourceConfig]:
    """The sources of the entries `names` of the dataset_info.json at `path` (`at`: the config key
    that named them, for errors)."""
    if path is None:
        raise DataError(f"{at}: names entries of a dataset_info.json; set data.dataset_info=PATH")
    info_file = Path(path).expanduser()
    if info_file.is_dir():  # LLaMA-Factory's dataset_dir
        info_file = info_file / "dataset_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data.dataset_info: {info_file} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"data.dataset_info: {info_file}:{e.lineno}: bad JSON: {e.msg}") from None
    if not isinstance(info, dict):
        raise DataError(f"data.dataset_info: {info_file} must hold a JSON object of dataset entries")
    sources = []
    for name in names:
        if name not in info:
            raise DataError(f"{at}: no entry {name!r} in {info_file} (it has: {', '.join(sorted(info))})")
        sources.append(entry_source(name, info[name], info_file.parent, f"{info_file} entry '{name}'"))
    return sources


def entry_source(name: str, entry: Any, folder: Path, where: str) -> SourceConfig:
    """One dataset_info.json entry as a source; DataError naming `where` and the key it cannot map."""

    def refuse(key: str, why: str) -> DataError:
        return DataError(f"{where}: {key}: {why}")

    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise refuse(key, f"not a dataset_info.json key (known: {', '.join(sorted(ENTRY_KEYS))})")
    for key, why in UNSUPPORTED.items():
        if entry.get(key):
            raise refuse(key, why)
    if entry.get("ranking"):
        raise refuse("ranking", "preference data (chosen/rejected) is not supervised fine-tuning data")
    columns, tags = _object(entry, "columns", refuse), _object(entry, "tags", refuse)
    for column, what in TEXT_ONLY.items():
        if columns.get(column):
            raise refuse(f"columns.{column}", f"{what} are not supported: Ouro reads text only")
    for column in PREFERENCE:
        if columns.get(column):
            raise refuse(f"columns.{column}", "preference and KTO data are not supervised fine-tuning data")

    src = SourceConfig(name=name)
    if entry.get("hf_hub_url"):
        src.hf_id, src.split = entry["hf_hub_url"], entry.get("split") or "train"
        src.hf_name = entry.get("subset")
    elif entry.get("file_name"):
        for key, default in (("subset", None), ("split", "train")):
            if entry.get(key, default) != default:
                raise refuse(key, f"{entry[key]!r} applies to hub datasets; a local file_name is read whole")
        file = folder / entry["file_name"]
        src.path = str(file / "*") if file.is_dir() else str(file)
    else:
        hub = next((k for k in ("ms_hub_url", "om_hub_url") if entry.get(k)), None)
        raise refuse(hub or "file_name", "only Hugging Face hub datasets (hf_hub_url) and local files (file_name) "
                     "are read" if hub else "missing: set file_name (a local file) or hf_hub_url")
    if entry.get("num_samples") is not None:
        count = entry["num_samples"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise refuse("num_samples", f"must be a positive integer, got {count!r}")
        src.count = count

    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        src.format, mapping = Format.alpaca, ALPACA_COLUMNS
    elif formatting == "sharegpt":
        src.format, mapping = Format.sharegpt, SHAREGPT_COLUMNS
    else:
        raise refuse("formatting", f"{formatting!r} is not alpaca or sharegpt")
    for column in columns:  # the other format's columns are unused, as in LLaMA-Factory
        if column not in ALPACA_COLUMNS and column not in SHAREGPT_COLUMNS:
            raise refuse(f"columns.{column}", "not a dataset_info.json column (known: "
                         f"{', '.join(sorted({*ALPACA_COLUMNS, *SHAREGPT_COLUMNS, *TEXT_ONLY, *PREFERENCE}))})")
    src.fields = {ours: columns.get(theirs, default) for theirs, (ours, default) in mapping.items()}
    if formatting == "alpaca":  # tags describe sharegpt messages: unused here, as in LLaMA-Factory
        return src
    for tag in tags:
        if tag not in ROLE_TAGS and tag not in ("role_tag", "content_tag"):
            raise refuse(f"tags.{tag}", f"not a sharegpt tag (known: role_tag, content_tag, {', '.join(ROLE_TAGS)})")
    src.fields.update({"from": tags.get("role_tag", "from"), "value": tags.get("content_tag", "value")})
    src.role_map = {tags.get(tag, default): role for tag, (default, role) in ROLE_TAGS.items()}
    return src


def _object(entry: dict, key: str, refuse) -> dict:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise refuse(key, f"expected a JSON object, got {type(value).__name__}")
    return value
