"""Each LoRA variant exported merged and adapter-only reproduces base + adapter as peft computes it."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import shared_path, tiny_model
from ouro_train.export import export_model
from ouro_train.config import LoraConfig, LoraInit
from ouro_train.train.lora import apply_lora

VOCAB = 49152
VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora+gaussian": dict(use_rslora=True, init=LoraInit.gaussian),
    "pissa": dict(init=LoraInit.pissa),  # the base keeps W - BA: the adapter-only export relies on peft
    "olora": dict(init=LoraInit.olora),  # recomputing that residual from the base model when it loads
}


@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_and_adapter_only_equal_base_plus_adapter(variant, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))
    base_dir = tmp_path / "base"
    tiny_model(seed=71, vocab_size=VOCAB).save_pretrained(base_dir)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir),
                       LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                                  modules_to_save=["early_exit_gate"], **VARIANTS[variant]))
    for name, param in model.named_parameters():
        if param.requires_grad:  # as if trained: B is no longer zero, the magnitude no longer ||W||
            param.add_(torch.randn_like(param) * 0.02)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    ids = torch.randint(3, VOCAB, (2, 10))
    expected = model.eval()(ids).logits

    merged = export_model(model, tmp_path / "merged", tokenizer, dtype="fp32")
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits, expected,
                               rtol=0, atol=2e-5)
    adapter = export_model(model, tmp_path / "adapter", tokenizer, dtype="fp32", mode="adapter_only")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=2e-5)
