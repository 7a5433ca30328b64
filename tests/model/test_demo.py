"""`ouro-demo`, the installation self-check CI runs first: save, reload through the Auto classes, generate."""

import json

import pytest
import torch

from ouro_train import demo


def test_demo_saves_reloads_and_generates(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "model"), "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert "reloaded weights identical: True" in out
    generated = next(line for line in out.splitlines() if line.startswith("generated:"))
    assert len(json.loads(generated.split(":", 1)[1])) == 5
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_demo_fails_when_the_reloaded_model_differs(tmp_path, monkeypatch):
    load = demo.AutoModelForCausalLM.from_pretrained

    def corrupted(path):
        model = load(path)
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1.0
        return model

    monkeypatch.setattr(demo.AutoModelForCausalLM, "from_pretrained", corrupted)
    with pytest.raises(SystemExit, match="reloaded model differs"):
        demo.main(["--out", str(tmp_path / "model")])
