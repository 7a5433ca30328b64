"""The export's README.md: a model card written from what the run recorded.

From a training run (`export_run`): the base model and its licence, the recipe and its command-line
overrides (Hydra's `.hydra/`), the resolved key settings and the steps and tokens trained (the
checkpoint's `trainer_state.json`), the data mix per source (the manifest the trainer copied into
`model/`), and the last train and eval losses per recurrent step up to the checkpoint (`metrics.jsonl`).
What a run did not record is left out. An in-memory export (`export_model`) knows only its model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ouro_train.run_dir import RunDir, trainer_state_file

README = "README.md"
KEY_SETTINGS = (
    "objective.name", "data.max_seq_len", "data.pack", "train.micro_batch_size", "train.global_batch_size",
    "train.global_batch_tokens", "optim.lr", "optim.weight_decay", "optim.warmup_ratio", "optim.warmup_steps",
    "optim.min_lr_ratio", "deepspeed.zero_stage", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
    "lora.modules_to_save", "lora.use_dora", "lora.use_rslora", "lora.init", "lora.loraplus_lr_ratio", "seed",
)


@dataclass
class CardFacts:
    mode: str  # full | merge | adapter_only
    dtype: str
    total_ut_steps: int
    remote_code: bool
    base_model: str | None  # a path or hub id; None: not recorded, or random_init
    random_init: bool = False
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the resolved run config
    trained: dict = field(default_factory=dict)  # trainer_state.json
    manifest: dict | None = None
    train_record: dict | None = None
    eval_record: dict | None = None


def run_facts(run_root: Path, checkpoint: Path, facts: CardFacts) -> CardFacts:
    """`facts` completed with what the run at `run_root` recorded up to `checkpoint`."""
    layout = RunDir(run_root)
    hydra = layout.hydra_dir
    if (hydra / "hydra.yaml").is_file():
        from omegaconf import OmegaConf

        job = OmegaConf.load(hydra / "hydra.yaml").hydra
        facts.recipe, facts.overrides = job.job.config_name, list(job.overrides.task)
    state_file = trainer_state_file(checkpoint)
    facts.trained = json.loads(state_file.read_text()) if state_file.is_file() else {}
    facts.settings = facts.trained.get("config", {})
    model = facts.settings.get("model", {})
    if facts.base_model is None and model:
        facts.base_model = model["path"] if model["init"] == "pretrained" else None
        facts.random_init = model["init"] == "random"
    manifest = layout.data_manifest_file
    facts.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
    step = facts.trained.get("step")
    metrics = layout.metrics_file
    if step is not None and metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("step", 0) <= step]
        # the last train record with per-step losses (logged every train.log_every steps)
        facts.train_record = next((r for r in reversed(records) if r.get("split", "train") == "train"
                                   and "loss_step1" in r), None)
        facts.eval_record = next((r for r in reversed(records) if r.get("split") == "eval"), None)
    return facts


def write_model_card(out_dir: Path, facts: CardFacts) -> None:
    sections = [_front_matter(facts), _summary(facts), _training(facts), _data(facts), _losses(facts),
                _how_to_load(facts), _licence(facts)]
    (out_dir / README).write_text("\n".join(s for s in sections if s))


def base_licence(base_model: str | None) -> str | None:
    """The `license:` of the base model's own card (its README.md front matter), where it is local."""
    readme = Path(base_model) / README if base_model else None
    if readme is None or not readme.is_file():
        return None
    front = re.match(r"---\n(.*?)\n---", readme.read_text(), re.S)
    found = re.search(r"^license:\s*(\S+)", front.group(1), re.M) if front else None
    return found.group(1) if found else None


def _front_matter(f: CardFacts) -> str:
    licence = base_licence(f.base_model)
    lines = ["---", "library_name: " + ("peft" if f.mode == "adapter_only" else "transformers"),
             "tags: [ouro, looped-language-model, ouro-train]"]
    if licence:
        lines.append(f"license: {licence}")
    return "\n".join(lines + ["---", ""])


def _summary(f: CardFacts) -> str:
    what = {"full": "full weights", "merge": "LoRA fine-tuned, the adapter merged into the weights",
            "adapter_only": "a LoRA adapter (peft) for the base model below"}[f.mode]
    base = f"`{f.base_model}`" if f.base_model else "none (random initialisation)" if f.random_init else "not recorded"
    return (f"# Ouro model exported by ouro-train\n\n{what[0].upper() + what[1:]}; {f.dtype} weights; "
            f"{f.total_ut_steps} recurrent steps (`total_ut_steps`).\n\n- Base model: {base}\n")


def _training(f: CardFacts) -> str:
    if not f.trained:
        return ""
    lines = ["## Training", ""]
    if f.recipe:
        lines.append(f"Recipe `{f.recipe}`" + (f" with `{' '.join(f.overrides)}`" if f.overrides else "") + ".")
    tokens = f.trained.get("tokens_seen")
    lines.append(f"Steps trained: {f.trained['step']}" + (f", tokens: {tokens:,}" if tokens is not None else "") + ".")
    lora = _lookup(f.settings, "lora.enabled")
    settings = [(key, _lookup(f.settings, key)) for key in KEY_SETTINGS if lora or not key.startswith("lora.")]
    settings = [(key, value) for key, value in settings if value is not None]
    if settings:
        lines += ["", "| setting | value |", "|---|---|", *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings)]
    for record in f.trained.get("config_changes", []):  # resumed with `resume_allow_changes`
        changes = ", ".join(f"`{k}` {json.dumps(old)} → {json.dumps(new)}" for k, (old, new) in record["changes"].items())
        lines += ["", f"Changed when resumed at step {record['step']}: {changes} (the values above are the last ones)."]
    return "\n".join(lines) + "\n"


def _data(f: CardFacts) -> str:
    if f.manifest is None:
        return ""
    rows = [f"| {name} | {v['domain']} | {v['spec']} | {v['kept']:,} | {v['tokens']:,} | {v['supervised_tokens']:,} |"
            for name, v in f.manifest["sources"].items()]
    return "\n".join(["## Data mix (one pass of the prepared training data)", "",
                      "| source | domain | drawn as | examples | tokens | supervised tokens |",
                      "|---|---|---|---|---|---|",
                      *rows, ""])


def _losses(f: CardFacts) -> str:
    rows = []
    for name, record, prefix in (("train", f.train_record, "loss_step"), ("eval", f.eval_record, "eval_loss_step")):
        if record is None:
            continue
        per_step = {int(k[len(prefix):]): v for k, v in record.items() if re.fullmatch(f"{prefix}\\d+", k)}
        cells = " | ".join(f"{per_step[t]:.4f}" if t in per_step else "" for t in range(1, f.total_ut_steps + 1))
        rows.append(f"| {name} (step {record['step']}) | {cells} |")
    if not rows:
        return ""
    header = " | ".join(f"T={t}" for t in range(1, f.total_ut_steps + 1))
    return "\n".join(["## Loss per recurrent step (reading the logits after step T)", "",
                      f"| | {header} |", "|---" * (f.total_ut_steps + 1) + "|", *rows, ""])


def _how_to_load(f: CardFacts) -> str:
    if f.mode == "adapter_only":
        return ("## How to load\n\n```python\nimport ouro_train  # registers the Ouro model with transformers\n"
                "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({json.dumps(str(f.base_model))})\n"
                "model = PeftModel.from_pretrained(base, \"path/to/this\")\n```\n")
    upstream = ("`AutoModelForCausalLM.from_pretrained(\"path/to/this\", trust_remote_code=True)` with transformers "
                "4.56; vLLM: `vllm serve path/to/this --trust-remote-code` (all recurrent steps run)"
                if f.remote_code else
                "this export has no remote code: add it with `ouro-export ... --remote-code DIR` "
                "(a downloaded upstream checkpoint) first")
    return ("## How to load\n\n- ouro-train: `import ouro_train`, then "
            "`AutoModelForCausalLM.from_pretrained(\"path/to/this\")`, or `ouro-generate --model path/to/this` "
            "(sampling defaults in `generation_config.json`: temperature 1.0, top-p 0.7).\n"
            f"- Upstream's remote code and vLLM: {upstream}.\n")


def _licence(f: CardFacts) -> str:
    licence = base_licence(f.base_model)
    if f.random_init:
        text = "No base model: the weights were trained from a random initialisation."
    elif f.base_model is None:
        text = "The base model's licence applies (the base model was not recorded)."
    elif licence:
        text = f"The base model's licence applies: `{licence}` (from its model card)."
    else:
        text = f"The base model's licence applies; see the model card of `{f.base_model}`."
    return f"## Licence\n\n{text}\n"


def _lookup(settings: dict, dotted: str):
    node = settings
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
