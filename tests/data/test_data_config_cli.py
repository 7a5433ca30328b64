"""The run config through Hydra (recipes, strictness, the thinking mix) and the ouro-prepare command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import GOOD_ROW, write_jsonl
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import HANG_GUARD_S, run_in_process
from ouro_train.cli import prepare, recipes_dir, strip_launcher_args
from ouro_train.config import Format, ModelInit, OnBadRow, RunConfig, to_object
from ouro_train.data.tokenizer import PROJECT_VOCAB_SIZE

REPO = Path(__file__).resolve().parents[2]
PREPARE = [sys.executable, "-c", "from ouro_train.cli import prepare; prepare()"]


def load(name="smoke", overrides=()):
    with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
        return to_object(compose(config_name=name, overrides=list(overrides)))


def test_smoke_recipe_is_a_typed_run_config():
    run = load()
    assert isinstance(run, RunConfig) and run.model.init is ModelInit.random
    assert run.model.config_overrides["vocab_size"] == PROJECT_VOCAB_SIZE
    assert run.data.max_seq_len == 512 and run.data.on_bad_row is OnBadRow.error
    assert [(s.name, s.format) for s in run.data.sources] == [
        ("math", Format.prompt_response), ("code", Format.alpaca), ("science", Format.sharegpt), ("chat", Format.messages)
    ]
    assert all(Path(s.path).exists() for s in run.data.sources)  # ${repo_root:} resolved


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_seq_lenn=5", "Key 'max_seq_lenn' not in 'DataConfig'"),
        ("data.overlong=chop", "Invalid value 'chop', expected one of [drop, truncate]"),
        ("data.max_seq_len=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_unknown_or_mistyped_keys_fail(override, message):
    with pytest.raises(ConfigCompositionException) as e:
        load(overrides=[override])
    assert message in str(e.value.__cause__)


def test_keys_added_with_plus_are_refused_too():
    with pytest.raises(ValueError, match="data.foo: unknown config key"):
        load(overrides=["+data.foo=1"])
    with pytest.raises(ValueError, match=r"data.sources.0.colour: unknown config key"):
        load(overrides=["+data.sources.0.colour=red"])


def test_unknown_key_in_a_recipe_file_fails(tmp_path):
    (tmp_path / "typo.yaml").write_text("defaults:\n  - run_schema\n  - _self_\ndata:\n  max_seqlen: 5\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="max_seqlen"):
            compose(config_name="typo")


def test_thinking_mix_domain_totals():
    run = load(overrides=["data=thinking_mix"])
    totals = {}
    for s in run.data.sources:
        assert s.hf_id and s.path is None and s.count is not None  # hub ids only; nothing is loaded here
        totals[s.domain] = totals.get(s.domain, 0) + s.count
    assert totals == {"math": 3_500_000, "code": 3_200_000, "science": 808_000, "chat": 767_000}
    assert sum(totals.values()) == 8_275_000
    ids = {s.hf_id for s in run.data.sources}
    assert {"open-thoughts/OpenThoughts3-1.2M", "nvidia/AceReason-1.1-SFT", "nvidia/OpenCodeReasoning",
            "nvidia/Llama-Nemotron-Post-Training-Dataset", "m-a-p/OO1-Chat-747K", "m-a-p/DeepWriting-20K"} == ids


def test_strip_launcher_args(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["prog", "--config-name", "smoke", "--local_rank=3", "seed=1"]) == ["prog", "--config-name", "smoke", "seed=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["prog", "--local-rank", "1", "x=y"]) == ["prog", "x=y"] and os.environ["LOCAL_RANK"] == "1"


def run_prepare(*args, cwd):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*PREPARE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_ouro_prepare_smoke_plan_and_build(tmp_path, monkeypatch, capsys):
    common = ["--config-name", "smoke", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"]
    assert run_in_process(monkeypatch, prepare, *common, "--plan", "--local_rank=0") == 0
    planned = capsys.readouterr().out
    science = [json.loads(line) for line in (REPO / "data" / "samples" / "science.jsonl").read_text().splitlines()]
    thinking = sum(any(t["value"].startswith("<think>") for t in r["conversations"] if t["from"] == "gpt") for r in science)
    assert 0 < thinking < 300
    assert (f"science                      science            300 {thinking:>11} {300 - thinking:>12} epochs=2"
            "                       600    2.00   44.4%") in planned
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("train-*"))

    built = run_prepare(*common, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (manifest,) = (tmp_path / "cache").glob("train-*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["num_documents"] == 1350 and m["max_seq_len"] == 512 and m["pack"] is True
    assert f"packing efficiency {m['packing_efficiency']:.1%}" in built.stdout


def test_ouro_prepare_bad_row_exits_with_one_line(tmp_path, monkeypatch, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, {"messages": [{"role": "robot", "content": "x"}]}])
    args = ["--config-name", "smoke", "data.sources=[]", f"data.train_files=[{bad}]",
            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"]
    failed = run_prepare(*args, cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: source 'bad' {bad}:2: field 'messages[0].role': unknown role 'robot' (known: system, user, assistant, "
        "tool; map other names with the source's `role_map`)"
    )
    assert "Traceback" not in failed.stderr

    # the skip policy through the same command, in this process (the process boundary is checked above)
    assert run_in_process(monkeypatch, prepare, *args, "data.on_bad_row=skip") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: source 'bad': 1 bad rows of 2 (50.00%) exceed data.max_bad_fraction=0.001 (unknown_role 1); first: "
    )
    assert run_in_process(monkeypatch, prepare, *args, "data.on_bad_row=skip", "data.max_bad_fraction=0.5") == 0
    assert "bad rows skipped: {'unknown_role': 1}" in capsys.readouterr().out


def test_ouro_prepare_with_another_recipe_folder(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "my_recipes"
    recipes.mkdir()
    rows = write_jsonl(tmp_path / "mine.jsonl", [GOOD_ROW] * 3)
    (recipes / "mine.yaml").write_text(
        f"defaults:\n  - run_schema\n  - _self_\ndata:\n  train_files: [{rows}]\n  max_seq_len: 64\n"
        f"  cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert run_in_process(monkeypatch, prepare, "--config-path", str(recipes), "--config-name", "mine", "--plan") == 0
    done = capsys.readouterr().out
    assert "mine                         general              3           0            3 epochs=1                         3    1.00  100.0%" in done
