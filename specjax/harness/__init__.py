"""Spec-Bench-style benchmark harness: `python -m specjax bench` (see `cli`).

  questions  Spec-Bench JSONL -> Question, prompts through the chat template
  runner     the interleaved, warmed-up, batch-1 loop -> results dict
  metrics    speedup, τ, α, predicted τ, identical-to-AR (pure functions)
  report     report.md and the PNG plots
  hf_peer    HF transformers on the same GGUF (optional extra: pip install -e '.[hf]')
  llamacpp_peer  llama.cpp on the same GGUF (optional extra: pip install -e '.[llamacpp]')
"""
