"""The launch scripts run as written (without an activated virtualenv), say what to do where they cannot
run, and the documents state what the tools do: the cluster section names ssh/pdsh or --no_ssh, and the
thinking recipe's checkpoint comment states the compute plan's own time per step."""

import os
import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from conftest import HANG_GUARD_S, REPO_ROOT
from ouro_train.config import to_object

VENV = Path(sys.executable).parent.parent
BARE_PATH = "/usr/bin:/bin"  # no virtualenv on it: the scripts must find their own tools


def script_env(**extra) -> dict:
    env = {"PATH": BARE_PATH, "HOME": os.environ.get("HOME", "/tmp"), "DS_ACCELERATOR": "cpu",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if "PYTHONPATH" in os.environ:  # a checkout other than the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return {**env, **extra}


def run_script(name: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "launch" / name), *args], env=script_env(**env), cwd="/",
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_single_node_script_runs_two_processes_without_the_venv_on_path(tmp_path):
    proc = run_script("single_node.sh", "smoke", f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
                      "dry_run=true", "plan.estimate_memory=false", "plan.tok_per_s_per_gpu=1000", "plan.gpus=2",
                      OURO_VENV=str(VENV), NUM_GPUS="2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rows" in proc.stdout  # ouro-prepare's summary
    assert proc.stdout.count("optimizer steps") == 2  # the plan, from each of the launcher's two processes
    assert (tmp_path / "out" / "plan.json").is_file()


def test_single_node_script_without_the_project_installed_says_so(tmp_path):
    proc = run_script("single_node.sh", "smoke", OURO_VENV=str(tmp_path), NUM_GPUS="2")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"launch/single_node.sh: no ouro-prepare/deepspeed in {tmp_path}/bin: install the "
                                   "project as README's Quick start says, or set OURO_VENV to the virtualenv that has it")


def test_multinode_script_outside_slurm_says_how_to_launch():
    proc = run_script("deepspeed_multinode.sh", "thinking_sft")
    assert proc.returncode == 2
    assert "unbound variable" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("launch/deepspeed_multinode.sh is a Slurm batch script: submit it with 'sbatch")
    assert "--hostfile launch/hostfile" in message and "pdsh" in message and "--no_ssh" in message


def test_the_cluster_section_names_what_the_hostfile_path_needs():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    section = section[:section.index("\n## ", 3)]
    for needed in ("ssh", "pdsh", "--no_ssh", ".venv/bin"):
        assert needed in section, needed
    assert "pdsh" in (REPO_ROOT / "launch" / "hostfile.example").read_text()


def test_the_thinking_recipes_checkpoint_comment_states_the_plans_time_per_step():
    from ouro_train.train.plan import compute_plan

    with initialize_config_dir(config_dir=str(REPO_ROOT / "recipes"), version_base="1.3"):
        # the policy auto takes at 32K on 80 GB (bench/memory_plan.py), without tracing every policy here
        run = to_object(compose(config_name="thinking_sft", overrides=["plan.gpus=32", "plan.estimate_memory=false",
                                                                        "model.checkpointing=layer:save_attn"]))
    plan = compute_plan(run)
    seconds_per_step = plan["time"]["wall_hours"] * 3600 / plan["optimizer_steps"]
    text = (REPO_ROOT / "recipes" / "thinking_sft.yaml").read_text()
    stated = re.search(r"(\d+) steps ≈ (\d+) h of (\d+) H100s: the plan's (\d+) s per step", text)
    assert stated, "the checkpoint comment no longer states the plan's figure"
    steps, hours, gpus, per_step = map(int, stated.groups())
    assert (steps, gpus) == (run.checkpoint.every_n_steps, run.plan.gpus)
    assert per_step == round(seconds_per_step)
    assert hours == round(steps * seconds_per_step / 3600)


def test_every_subprocess_timeout_in_the_tests_is_a_hang_guard():
    """A busy 2-core CI machine may run many times slower than a quiet one: a timeout guards against a
    hang (>= 30 minutes), it never asserts speed."""
    from conftest import HANG_GUARD_S

    assert HANG_GUARD_S >= 1800
    short = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in re.finditer(r"(?:timeout\s*=\s*|time\.(?:time|monotonic)\(\)\s*\+\s*)(\d+)", line):
                if int(match.group(1)) < 1800:
                    short.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not short, "\n".join(short)
