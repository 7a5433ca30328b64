"""The package's imports run one way: config, run_dir and checkpoint_files at the bottom, then model <- data
<- train <- (export, eval, generation) <- cli, and nothing but the CLI uses `train/` (the trainer orchestrates; the
layers above it read runs through run_dir). Read from the source, so a new import that runs back up
fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ouro_train"
LAYERS = {"config": 0, "run_dir": 0, "checkpoint_files": 0, "model": 1, "data": 2, "train": 3, "export": 4, "eval": 4,
          "generation": 4, "demo": 4, "cli": 5}
ALLOWED_UPWARD = {("train/__main__.py", "cli")}  # `python -m ouro_train.train` is the CLI's shim


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ouro_train" and len(parts) > 1 else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_import_runs_back_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        unit = relative.split("/")[0].removesuffix(".py")
        if unit == "__init__":
            continue  # the package face registers the model with transformers' Auto classes
        assert unit in LAYERS, f"{relative}: give its package a layer in this test"
        for module in _imports(path):
            target = _unit(module)
            if target is None or target == unit or (relative, target) in ALLOWED_UPWARD:
                continue
            if LAYERS[target] > LAYERS[unit] or (target == "train" and unit != "cli"):
                upward.append(f"{relative} imports {module}")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)
