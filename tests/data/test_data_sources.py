"""Sources at scale: the bad-row budget, hub loading options (through `load_dataset` on local files),
shared scans and `where` lists."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import chat, data_config, project_tok, write_jsonl

from ouro_train.config import Format, OnBadRow, SourceConfig
from ouro_train.data import DataError, pipeline, prepare
from ouro_train.data.pipeline import check_sources

BAD = {"messages": [{"role": "user", "content": "hi"}]}  # no assistant turn


def local(name, path, **kw):
    return SourceConfig(name=name, path=str(path), **kw)


def skip(tmp_path, sources, **kw):
    return data_config(tmp_path, sources, on_bad_row=OnBadRow.skip, **kw)


def test_budget_allows_up_to_its_fraction_of_bad_rows(tmp_path):
    rows = [chat(f"q{i}", str(i)) for i in range(1000)]
    rows[10] = BAD
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    (checked,) = check_sources(skip(tmp_path, [local("a", path)]), [local("a", path)], tmp_path / "w")
    assert len(checked.valid) == 999 and checked.bad == {"no_assistant_turn": 1}
    rows[20] = b"{oops"
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError) as e:
        check_sources(skip(tmp_path, [local("a", path)]), [local("a", path)], tmp_path / "w2")
    assert str(e.value).startswith(
        "source 'a': 2 bad rows of 1,000 (0.20%) exceed data.max_bad_fraction=0.001 (no_assistant_turn 1, bad_json 1); "
        f"first: source 'a' {path}:11: field 'messages': no assistant turn to train on"
    )
    # a source's own budget wins over data.max_bad_fraction
    src = local("a", path, max_bad_fraction=0.002)
    assert len(check_sources(skip(tmp_path, [src]), [src], tmp_path / "w3")[0].valid) == 998


def test_failed_budget_keeps_the_first_bad_rows_beside_the_cache(tmp_path):
    rows = [chat()] + [BAD] * 150
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = skip(tmp_path, [local("a", path)])
    with pytest.raises(DataError, match=r"the first bad rows are in (\S+)$") as e:
        prepare(data, project_tok())
    log = Path(e.value.args[0].rsplit(" ", 1)[1])
    assert log.parent == Path(data.cache_dir) and not list(Path(data.cache_dir).glob("train-*/"))
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == 100
    assert logged[0] == {"source": "a", "location": f"{path}:2", "reason": "no_assistant_turn",
                         "error": f"source 'a' {path}:2: field 'messages': no assistant turn to train on"}
    assert logged[-1]["location"] == f"{path}:101"


@pytest.mark.parametrize("mode", [OnBadRow.skip, OnBadRow.error])
def test_a_source_with_no_valid_row_stops_the_run(tmp_path, mode):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [BAD] * 3)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    data = data_config(tmp_path, [local("bad", path)], on_bad_row=mode, max_bad_fraction=1.0)
    message = "source 'bad' has no valid row: all 3 rows are bad" if mode == OnBadRow.skip else f"source 'bad' {path}:1"
    with pytest.raises(DataError, match=f"^{message}"):
        check_sources(data, data.sources, tmp_path / "w")
    src = local("empty", empty, format=Format.messages)
    with pytest.raises(DataError, match=f"^source 'empty' has no valid row: it read no row from {empty}$"):
        check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w2")


# ---- hub options, through load_dataset on local files -------------------------------------------


def hub_rows(tmp_path) -> list[Path]:
    """A 'hub dataset' of two parquet files (the `datasets` parquet builder stands in for a hub id)."""
    paths = []
    for part, domains in enumerate([("math", "code", "math"), ("science", "math", "code")]):
        rows = [{"domain": d, **chat(f"{d} question {part}{i}", f"{d} answer")} for i, d in enumerate(domains)]
        if part == 1:
            rows[2]["messages"][1]["content"] = " "  # one bad row: a code row
        paths.append(tmp_path / f"part-{part}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[-1])
    return paths


def hub(name, files, **kw):
    return SourceConfig(name=name, hf_id="parquet", data_files=[str(f) for f in files], **kw)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_reads_only_its_data_files_and_streams_alike(tmp_path, streaming):
    files = hub_rows(tmp_path)
    src = hub("h", files[:1], streaming=streaming)
    (checked,) = check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w")
    assert [m[0]["content"] for m in checked.rows["messages"]] == ["math question 00", "code question 01", "math question 02"]
    both = hub("h", files, streaming=streaming)
    with pytest.raises(DataError, match=r"^source 'h' parquet\[train\] row 5: field 'messages\[1\].content': empty or "):
        check_sources(data_config(tmp_path, [both]), [both], tmp_path / "w2")


def test_sources_of_one_dataset_share_a_scan_and_where_takes_lists(tmp_path, monkeypatch):
    files = hub_rows(tmp_path)
    scans = []
    real = pipeline.load_source
    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: scans.append(a[0].name) or real(*a, **k))
    sources = [hub("math", files, where={"domain": "math"}), hub("rest", files, where={"domain": ["code", "science"]})]
    math, rest = check_sources(skip(tmp_path, sources, max_bad_fraction=0.5), sources, tmp_path / "w")
    assert scans == ["math"]
    assert (len(math.valid), math.bad, math.filtered) == (3, {}, 3)
    # the blank answer is a code row: it counts against `rest` only
    assert (len(rest.valid), rest.bad, rest.filtered) == (2, {"empty_answer": 1}, 3)
    assert [m[0]["content"] for m in rest.rows.select(rest.valid)["messages"]] == ["code question 01", "science question 10"]


def test_where_matching_nothing_reports_the_values_it_found(tmp_path):
    files = hub_rows(tmp_path)
    src = hub("m", files, where={"domain": "maths"})
    with pytest.raises(DataError, match=r'^source \'m\': `where` \{\'domain\': \'maths\'\} matches none of its 6 rows; '
                                        r'values found: domain: "code", "math", "science"$'):
        check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w")


def test_hub_only_options_on_a_local_source_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat()])
    data = data_config(tmp_path, [local("a", path, streaming=True)])
    with pytest.raises(DataError, match=r"^data.sources\[0\]: data_files and streaming are for hub sources"):
        prepare(data, project_tok())
