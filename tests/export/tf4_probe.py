"""Run by a transformers 4.x interpreter (no ouro-train installed): what it reads from an export.

    python tf4_probe.py EXPORT_DIR OUT.json [--logits-of IDS.json]

Writes the tokenizer's rendering and ids of a fixed chat and, with --logits-of, the logits of the
upstream remote code (`trust_remote_code=True`) on the given ids, fp32.
"""

import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

# A chat with a system turn, a special token inside a message and a non-ASCII character.
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 × 7? <think>"},
            {"role": "assistant", "content": "84"}, {"role": "user", "content": "And 2+2?"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("out")
    parser.add_argument("--logits-of")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    result = {"transformers": transformers.__version__, "tokenizer_class": type(tokenizer).__name__, "text": text,
              "ids": tokenizer(text, add_special_tokens=False)["input_ids"],
              "special_tokens": tokenizer.all_special_tokens}
    if args.logits_of:
        model = AutoModelForCausalLM.from_pretrained(args.export_dir, trust_remote_code=True, torch_dtype=torch.float32)
        ids = torch.tensor(json.loads(open(args.logits_of).read()))
        with torch.no_grad():
            result["model_class"] = type(model).__module__ + "." + type(model).__name__
            result["logits"] = model.eval()(ids, use_cache=False).logits.tolist()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
