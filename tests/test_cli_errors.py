"""What `ouro-train` / `ouro-prepare` answer before any work: `--help`, no recipe, a bad key or value, an
unwritable output_dir, a depth override against the checkpoint's layer_types, a sequence longer than the
model's positions, too little data for one step, an empty file, and the dry run's count of local data.
The answers that need no model must come before torch and transformers are imported (what makes them
appear at once): checked in a fresh interpreter through sys.modules, never with a clock."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, REPO_ROOT, SHARED, run_in_process
from ouro_train.cli import prepare, train
from ouro_train.config import ConfigError

ENTRY = """
import json, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
from ouro_train.cli import prepare, train
try:
    (train if sys.argv[0] == "ouro-train" else prepare)()
    status = 0
except SystemExit as e:
    status = e.code
print(json.dumps({"status": status, "heavy": sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)}))
"""


def run_entry(prog: str, *args: str, cwd: Path) -> tuple[dict, str, str]:
    """`prog args` in a fresh interpreter: ({status, heavy modules imported}, stdout before that, stderr)."""
    proc = subprocess.run([sys.executable, "-c", ENTRY, prog, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=HANG_GUARD_S)
    *out, last = proc.stdout.strip().splitlines() or [""]
    return json.loads(last), "\n".join(out), proc.stderr


@pytest.mark.parametrize("prog", ["ouro-train", "ouro-prepare"])
def test_help_lists_the_recipes_and_common_overrides_without_importing_torch(prog, tmp_path):
    result, out, _ = run_entry(prog, "--help", cwd=tmp_path)
    assert result == {"status": 0, "heavy": []}
    for recipe in ("smoke", "sft", "thinking_sft", "lora_domain"):
        assert f"\n  {recipe} " in out
    assert ("dry_run=true" if prog == "ouro-train" else "--plan") in out
    assert "output_dir=DIR" in out or "data.cache_dir=DIR" in out


def test_no_recipe_lists_the_recipes(tmp_path):
    result, _, err = run_entry("ouro-train", cwd=tmp_path)
    assert result == {"status": 2, "heavy": []}
    assert err.strip().splitlines() == [
        "error: no recipe: ouro-train --config-name RECIPE, one of lora_domain, sft, smoke, thinking_sft "
        "(ouro-train --help for the common overrides)"]


@pytest.mark.parametrize("prog, override, message", [
    ("ouro-prepare", "+data.foo=1", "error: data.foo: unknown config key (not a field of DataConfig"),
    ("ouro-train", "optim.lr=0", "error: optim.lr: must be > 0, got 0.0"),
    ("ouro-train", "foo=1", "error: Could not override 'foo'."),
])
def test_a_config_error_is_one_line_before_torch(prog, override, message, tmp_path):
    result, _, err = run_entry(prog, "--config-name", "smoke", f"output_dir={tmp_path / 'out'}", override, cwd=tmp_path)
    assert result == {"status": 1, "heavy": []}
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err


def test_an_unwritable_output_dir_is_named(tmp_path):
    # A regular file where a parent directory should be: unwritable whoever runs the test (root included).
    (tmp_path / "file").write_text("")
    result, _, err = run_entry("ouro-train", "--config-name", "smoke", f"output_dir={tmp_path / 'file' / 'run'}",
                               cwd=tmp_path)
    assert result == {"status": 1, "heavy": []}
    assert err.strip() == f"error: output_dir={tmp_path / 'file' / 'run'}: cannot write there (Not a directory)"


def test_import_ouro_train_still_registers_the_auto_classes(tmp_path):
    """`import ouro_train` before transformers (registered the moment transformers is imported, also after
    a library probed for it with find_spec) and after it."""
    probe = "import ouro_train, importlib.util; assert importlib.util.find_spec('transformers'); import transformers"
    for order in ("import ouro_train, transformers", "import transformers, ouro_train", probe):
        code = (f"{order}\n"
                "from transformers import AutoConfig, AutoModelForCausalLM\n"
                f"from conftest import tiny_config\n"
                f"tiny_config().save_pretrained({str(tmp_path)!r})\n"
                f"model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(tmp_path)!r}))\n"
                "print(type(model).__module__, type(model).__name__)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S,
                              cwd=REPO_ROOT / "tests")
        assert proc.stdout.split() == ["ouro_train.model.modeling", "OuroForCausalLM"], proc.stderr[-2000:]


def ouro_checkpoint(tmp_path: Path, **changes) -> Path:
    """A checkpoint directory holding Ouro-1.4B's real config.json (no weights: the config read needs none)."""
    path = tmp_path / "ouro-1.4b"
    path.mkdir()
    config = json.loads((SHARED / "ouro-1.4b-files" / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


def compose(*overrides: str, recipe: str = "lora_domain"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ouro_train.config import to_object

    with initialize_config_dir(config_dir=str(REPO_ROOT / "recipes"), version_base="1.3"):
        return to_object(hydra_compose(config_name=recipe, overrides=list(overrides)))


def test_a_depth_override_keeps_layer_types_one_per_layer(tmp_path):
    """Ouro-1.4B's 24 full-attention layers taken to the 2.6B depth: the config the run builds saves."""
    from ouro_train.model import OuroConfig

    base = ouro_checkpoint(tmp_path)
    run = compose(f"model.path={base}", "+model.config_overrides.num_hidden_layers=48")
    overrides = dict(run.model.config_overrides)
    assert overrides["layer_types"] == ["full_attention"] * 48
    config = OuroConfig.from_pretrained(base, **overrides)
    config.save_pretrained(tmp_path / "saved")  # what failed: "must be equal to the number of layer_types"
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["num_hidden_layers"] == 48


def test_a_depth_override_over_mixed_layer_types_is_refused(tmp_path):
    base = ouro_checkpoint(tmp_path, layer_types=["full_attention", "sliding_attention"] * 12)
    with pytest.raises(ConfigError, match=r"^model.config_overrides.num_hidden_layers: 48 layers, but .* lists 24 "
                                          r"layer_types of several kinds"):
        compose(f"model.path={base}", "+model.config_overrides.num_hidden_layers=48")


def test_max_seq_len_beyond_the_models_positions_is_refused(tmp_path):
    base = ouro_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.max_seq_len: 131072 exceeds the model's max_position_embeddings "
                                          r"65536 \(.*config.json\)"):
        compose(f"model.path={base}", "data.max_seq_len=131072")
    compose(f"model.path={base}", "data.max_seq_len=65536")


def write_rows(path: Path, rows: int) -> Path:
    lines = (REPO_ROOT / "data" / "samples" / "chat.jsonl").read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_too_little_data_for_one_step_gives_the_counts(tmp_path, data_cache):
    data = write_rows(tmp_path / "small.jsonl", 8)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ouro-train"), "--config-name", "smoke", f"output_dir={tmp_path / 'out'}",
         f"data.cache_dir={data_cache}", "data.sources=[]", f"data.train_files=[{data}]", "max_steps=null",
         "train.micro_batch_size=1", "train.global_batch_size=16", "wandb.mode=disabled"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the training data is smaller than one optimizer step: ")
    assert "for a global batch of 16 sequences (train.micro_batch_size=1 × 1 data-parallel ranks × 16 " \
           "accumulation steps)" in error
    rows = json.loads(next(Path(data_cache).glob("train-*/manifest.json")).read_text())["num_rows"]
    assert f": {rows} packed row" in error and rows < 16


def test_an_empty_training_file_is_named(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status = run_in_process(monkeypatch, prepare, "--config-name", "smoke", f"output_dir={tmp_path / 'out'}",
                            f"data.cache_dir={tmp_path / 'cache'}", "data.sources=[]", f"data.train_files=[{empty}]")
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: source 'empty' has no valid row: it read no row from {empty}"


def test_the_dry_run_counts_local_files_and_then_the_prepared_data(tmp_path, monkeypatch):
    data = write_rows(tmp_path / "chat.jsonl", 40)
    args = ("--config-name", "smoke", f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.sources=[]", f"data.train_files=[{data}]", "max_steps=null", "dry_run=true",
            "plan.estimate_memory=false", "plan.tok_per_s_per_gpu=1000", "plan.gpus=1")
    assert run_in_process(monkeypatch, train, *args) == 0
    before = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert run_in_process(monkeypatch, prepare, *args[:-4]) == 0
    manifest = json.loads(next((tmp_path / "cache").glob("train-*/manifest.json")).read_text())
    assert run_in_process(monkeypatch, train, *args) == 0
    after = json.loads((tmp_path / "out" / "plan.json").read_text())

    # 40 rows (< 256 per source): every row was tokenized for the mean, so the token count is exact.
    assert before["examples_per_epoch"] == 40 == manifest["num_documents"]
    assert before["tokens_per_epoch"] == pytest.approx(manifest["num_tokens"], rel=1e-12)
    assert before["tokens_per_epoch"] < 40 * 4000 / 10  # not plan.tokens_per_example per row
    assert (after["examples_per_epoch"], after["tokens_per_epoch"], after["packed_rows_per_epoch"]) == \
        (manifest["num_documents"], manifest["num_tokens"], manifest["num_rows"])
    assert after["tokens_basis"].startswith("the prepared data in ")


def test_the_plans_longest_max_seq_len_stays_within_the_models_positions(data_cache):
    """The smoke model has 512 positions; 80 GiB would hold far longer rows of it."""
    from ouro_train.train.plan import compute_plan, format_memory

    run = compose("plan.gpus=1", "plan.tok_per_s_per_gpu=1000", f"data.cache_dir={data_cache}", recipe="smoke")
    memory = compute_plan(run)["memory"]
    assert memory["longest_max_seq_len"] == 512 and memory["longest_is_position_limit"]
    assert format_memory(memory, 1).endswith("longest max_seq_len on 80 GiB: 512   (the model's "
                                              "max_position_embeddings; the memory holds more)")
