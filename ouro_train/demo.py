"""`ouro-demo`: build a tiny random Ouro, save it, reload it through `AutoModelForCausalLM`, generate.

A self-check of an installation: no download, runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ouro_train.model import OuroConfig, OuroForCausalLM

LOGITS_TOLERANCE = 1e-6  # a few float32 ulps of logits of order 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo-model"), help="where to save the model")
    parser.add_argument("--ut-steps", type=int, default=4, help="recurrent steps T")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = OuroConfig(
        vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, total_ut_steps=args.ut_steps, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = OuroForCausalLM(config).eval()
    model.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()

    saved, loaded = model.state_dict(), reloaded.state_dict()
    weights_same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    prompt = torch.randint(3, config.vocab_size, (1, 8))
    with torch.no_grad():
        out = reloaded(prompt)
        # Not bitwise: two instances' CPU kernels may take different vector paths by allocation alignment.
        logits_diff = (model(prompt).logits - out.logits).abs().max().item()
        tokens = reloaded.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None)
    params = sum(p.numel() for p in reloaded.parameters())
    print(f"saved {type(reloaded).__name__} ({params:,} parameters, T={config.total_ut_steps}) to {args.out}")
    print(f"reloaded weights identical: {weights_same}; logits max |difference|: {logits_diff:.1e}")
    print(f"mean exit step of the prompt tokens: {(out.exit_pdf * torch.arange(1, config.total_ut_steps + 1)).sum(-1).mean():.3f}")
    print(f"prompt:    {prompt[0].tolist()}")
    print(f"generated: {tokens[0, prompt.shape[1]:].tolist()}")
    if not weights_same or logits_diff > LOGITS_TOLERANCE:
        raise SystemExit("reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
