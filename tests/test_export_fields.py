"""Export into the original's code: config.json holds every field its classes read, for any model,
and the tokenizers go beside the weights in the layout its scripts load."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tokenizers

from mmada_jax import ImageTokenizer, MMaDA, MMaDAConfig
from mmada_jax.checkpoint import hf_mmada, magvit
from mmada_jax.convert import main as convert_main
from mmada_jax.prompting import TextTokenizer

# The original's models/configuration_llada.py, dataclass ``ModelConfig``: LLaDAModelLM.__init__
# (models/modeling_llada.py, create_model_config_from_pretrained_config) reads every one of these
# with getattr from the config object, so a config.json without one fails with AttributeError.
LLADA_MODEL_CONFIG_FIELDS = (
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "activation_type",
    "block_type", "block_group_size", "alibi", "alibi_bias_max", "rope", "rope_full_precision",
    "flash_attention", "attention_dropout", "multi_query_attention", "attention_layer_norm",
    "residual_dropout", "embedding_dropout", "input_emb_norm", "layer_norm_type", "layer_norm_with_affine",
    "rms_norm_eps", "attention_layer_norm_with_affine", "max_sequence_length", "rope_theta",
    "include_qkv_bias", "include_bias", "bias_for_layer_norm", "scale_logits", "vocab_size",
    "embedding_size", "weight_tying", "eos_token_id", "pad_token_id", "mask_token_id", "init_device",
    "init_fn", "init_std", "init_cutoff_factor", "precision",
)
# The original's models/modeling_mmada.py, class ``MMadaConfig``: its ``allowed_keys``, copied when
# present (the last two only matter for training, so an export need not invent them).
MMADA_CONFIG_KEYS = ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens",
                     "num_new_special_tokens", "new_vocab_size")
MMADA_OPTIONAL_KEYS = ("llm_model_path", "gradient_checkpointing")
# models/modeling_llada.py ``LLaDAModelLM.forward`` reads ``config.use_cache``; transformers'
# ``PretrainedConfig`` / ``PreTrainedModel`` read the others (``tie_word_embeddings`` defaults to True,
# which would tie the LM head ``ff_out`` to ``wte``).
HF_FIELDS = ("use_cache", "model_type", "architectures", "tie_word_embeddings", "torch_dtype")
# The released MMaDA-8B's config.json values of the fields that do not change the forward pass.
RELEASED = {"mlp_ratio": 4, "alibi_bias_max": 8.0, "flash_attention": False,
            "attention_layer_norm_with_affine": True, "init_device": "meta", "init_fn": "mitchell",
            "init_std": 0.02, "init_cutoff_factor": None, "precision": "amp_bf16"}
# Fields whose value changes the computation: the exported value must be the model's own.
COMPUTE_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                  "rope_theta", "rms_norm_eps", "max_sequence_length", "mask_token_id", "eos_token_id",
                  "pad_token_id", "llm_vocab_size", "codebook_size", "num_vq_tokens")
# The original's models/modeling_magvitv2.py: keyword arguments of ``VQGANEncoder.__init__`` and
# ``VQGANDecoder.__init__`` (the keys of encoder_config / decoder_config) and of ``LFQuantizer``
# (``codebook_dim``); ``MAGVITv2.__init__`` itself takes none. ``_class_name`` is diffusers' ConfigMixin's.
VQGAN_KWARGS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_ch", "out_ch",
                "resolution", "z_channels", "double_z")
MAGVIT_FIELDS = ("_class_name", "codebook_dim", "encoder_config", "decoder_config")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXTS = ["What is 3 + 4? <think> 3 + 4 = 7 </think> 7", "a handwritten digit 5", "seven plus two is nine"] * 8


def _built_like_original(cfg: dict) -> dict:
  """What the original's model constructor reads from config.json (a KeyError stands for its
  AttributeError), and the architecture it then builds."""
  kw = {name: cfg[name] for name in LLADA_MODEL_CONFIG_FIELDS + MMADA_CONFIG_KEYS + HF_FIELDS}
  n_kv = kw["n_kv_heads"] if kw["n_kv_heads"] is not None else (1 if kw["multi_query_attention"] else kw["n_heads"])
  mlp = kw["mlp_hidden_size"] if kw["mlp_hidden_size"] is not None else kw["mlp_ratio"] * kw["d_model"]
  assert kw["embedding_size"] >= kw["vocab_size"]
  assert not kw["alibi"] and kw["rope"] and not kw["weight_tying"] and not kw["tie_word_embeddings"]
  assert kw["attention_dropout"] == kw["residual_dropout"] == kw["embedding_dropout"] == 0.0
  return {"n_kv_heads": n_kv, "mlp_hidden_size": mlp, "rows": kw["embedding_size"] or kw["vocab_size"]}


def _check_model_config(cfg: dict, model: MMaDAConfig) -> None:
  built = _built_like_original(cfg)
  assert built == {"n_kv_heads": model.n_kv_heads, "mlp_hidden_size": model.mlp_hidden_size,
                   "rows": model.vocab_size}
  for name in COMPUTE_FIELDS:
    assert cfg[name] == getattr(model, name), name


@pytest.fixture(scope="module")
def text_tok(tmp_path_factory) -> tuple[TextTokenizer, str]:
  """The demo's kind of tokenizer (byte-level BPE holding every MMaDA token), saved."""
  from mmada_jax.demo.tokenizers import build_text_tokenizer
  tok = build_text_tokenizer(TEXTS, vocab_size=320)
  return tok, tok.save(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def demo_model(text_tok) -> MMaDA:
  """configs/demo.py's model section (``demo_model_config``), randomly initialised."""
  from mmada_jax.demo.data import demo_model_config
  kw = demo_model_config(text_tok[0], codebook_size=256, num_image_tokens=16, max_text_len=24)
  kw.pop("max_text_len"), kw.pop("num_image_tokens")
  return MMaDA.init(MMaDAConfig(**kw), seed=0)


@pytest.fixture(scope="module")
def demo_magvit(tmp_path_factory) -> tuple[ImageTokenizer, str]:
  from mmada_jax.demo.tokenizers import demo_magvit_config
  tok = ImageTokenizer.init(demo_magvit_config(), seed=0)
  path = str(tmp_path_factory.mktemp("magvit") / "magvit")
  tok.save_pretrained(path)
  return tok, path


def _scratch_config() -> MMaDAConfig:
  # Non-default values everywhere the computation depends on them.
  return MMaDAConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                     rope_theta=10000.0, rms_norm_eps=1e-6, max_sequence_length=64, mask_token_id=3,
                     eos_token_id=1, pad_token_id=1, llm_vocab_size=44, codebook_size=256, num_vq_tokens=16)


def test_the_code_table_is_the_originals_list():
  table = {f.name: f for f in hf_mmada.ORIGINAL_CONFIG_FIELDS}
  assert set(LLADA_MODEL_CONFIG_FIELDS + MMADA_CONFIG_KEYS + MMADA_OPTIONAL_KEYS + HF_FIELDS) <= set(table)
  assert {n for n, f in table.items() if f.kind == hf_mmada.OPTIONAL} == set(MMADA_OPTIONAL_KEYS)
  assert {n: f.value for n, f in table.items() if n in RELEASED} == RELEASED
  assert all(table[n].kind == hf_mmada.RELEASED for n in RELEASED)
  # Everything the model's own config writes is documented, and the fixed values are what it writes.
  written = _scratch_config().to_hf_config()
  assert set(written) <= set(table)
  for f in hf_mmada.ORIGINAL_CONFIG_FIELDS:
    if f.kind == hf_mmada.FIXED:
      assert written[f.name] == f.value, f.name
  assert {name for name, _, _ in magvit.ORIGINAL_CONFIG_FIELDS} >= set(MAGVIT_FIELDS)
  assert magvit.VQGAN_FIELDS == VQGAN_KWARGS


def test_from_scratch_export_is_complete_and_round_trips(tmp_path):
  model = MMaDA.init(_scratch_config(), seed=1)
  model.save_pretrained(tmp_path / "hf", format="hf")
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  _check_model_config(cfg, model.config)
  for name, value in RELEASED.items():
    assert cfg[name] == value, name
  back = MMaDA.from_pretrained(tmp_path / "hf")
  for name in COMPUTE_FIELDS:
    assert getattr(back.config, name) == getattr(model.config, name), name
  ids = np.arange(6, 46).reshape(2, 20)
  np.testing.assert_array_equal(np.asarray(model.logits(ids)), np.asarray(back.logits(ids)))


def test_demo_sized_model_exports_one_folder(demo_model, text_tok, demo_magvit, tmp_path):
  tok, tok_dir = text_tok
  demo_model.save_pretrained(tmp_path / "orbax")
  orbax_cfg = json.loads((tmp_path / "orbax" / "config.json").read_text())
  assert set(LLADA_MODEL_CONFIG_FIELDS) <= set(orbax_cfg)           # our own format carries them too
  dst = tmp_path / "export"
  assert convert_main(["to-hf", str(tmp_path / "orbax"), str(dst), "--text-tokenizer", tok_dir,
                       "--image-tokenizer", demo_magvit[1]]) == 0
  for name in ("config.json", "model.safetensors", "generation_config.json") + TOKENIZER_FILES:
    assert (dst / name).is_file(), name
  cfg = json.loads((dst / "config.json").read_text())
  _check_model_config(cfg, demo_model.config)
  assert {k: cfg[k] for k in RELEASED} == RELEASED
  back = MMaDA.from_pretrained(dst)
  ids = np.arange(4, 36).reshape(2, 16)
  np.testing.assert_array_equal(np.asarray(demo_model.logits(ids)), np.asarray(back.logits(ids)))
  _check_tokenizer_folder(dst, tok)
  _check_magvit_folder(dst / "image_tokenizer", demo_magvit[0])


def test_imported_export_keeps_the_checkpoints_fields(tiny_mmada_dir, tiny_magvit_dir, tmp_path):
  src = json.loads((tiny_mmada_dir / "config.json").read_text())
  assert convert_main(["to-orbax", str(tiny_mmada_dir), str(tmp_path / "o")]) == 0
  assert convert_main(["to-hf", str(tmp_path / "o"), str(tmp_path / "hf")]) == 0
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  _built_like_original(cfg)
  assert {k: cfg[k] for k in src} == src                  # every field of the original's file, same value
  # The MAGVIT-v2 fixture exports with every field of the original's layout, unchanged.
  tok = ImageTokenizer.from_pretrained(tiny_magvit_dir)
  tok.save_pretrained(tmp_path / "magvit")
  _check_magvit_folder(tmp_path / "magvit", tok)
  want = json.loads((tiny_magvit_dir / "config.json").read_text())
  assert json.loads((tmp_path / "magvit" / "config.json").read_text()) == want


def _check_tokenizer_folder(folder, tok: TextTokenizer) -> None:
  backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  text = "What is 3 + 4? <think> 7 </think>"
  assert backend.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False)
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  special = json.loads((folder / "special_tokens_map.json").read_text())
  assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"]
  assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
  assert cfg["mask_token"] == "<|mdm_mask|>"
  for name in ("<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>", "[iPAD]", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"):
    assert name in cfg["additional_special_tokens"] and name in special["additional_special_tokens"], name
  assert {k: special[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token")} == \
      {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token")}
  decoder = {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()}
  assert decoder == {t["id"]: t["content"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
  # Our loader reads the folder back to the same tokenizer and chat prompt.
  again = TextTokenizer.from_file(folder)
  msgs = [{"role": "user", "content": "  What is 3 + 4?  "}]
  assert len(again) == len(tok) and again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
  try:
    import jinja2
  except ImportError:       # transformers renders chat_template with Jinja; check it where Jinja is installed
    return
  template = jinja2.Environment().from_string(cfg["chat_template"])
  for gen in (True, False):
    assert template.render(messages=msgs, bos_token=cfg["bos_token"], add_generation_prompt=gen) == \
        tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def _check_magvit_folder(folder, tok: ImageTokenizer) -> None:
  assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.safetensors"]
  cfg = json.loads((folder / "config.json").read_text())
  for name in MAGVIT_FIELDS:
    assert name in cfg, name
  for part in ("encoder_config", "decoder_config"):
    assert set(cfg[part]) == set(VQGAN_KWARGS), part
  assert cfg["codebook_dim"] == tok.config.codebook_dim
  back = ImageTokenizer.from_pretrained(folder)
  assert back.config == tok.config
  for a, b in zip(*(jax_leaves(t.params) for t in (tok, back))):
    np.testing.assert_array_equal(a, b)


def jax_leaves(params) -> list[np.ndarray]:
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_export_run_writes_one_folder(demo_model, text_tok, demo_magvit, tmp_path):
  run = tmp_path / "run"
  demo_model.save_pretrained(run / "model")
  text_tok[0].save(run / "text_tokenizer")
  demo_magvit[0].save_pretrained(run / "image_tokenizer")
  dst = tmp_path / "out"
  assert convert_main(["export-run", str(run), str(dst)]) == 0
  assert sorted(os.listdir(dst)) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                            "image_tokenizer", *TOKENIZER_FILES])
  _check_model_config(json.loads((dst / "config.json").read_text()), demo_model.config)
  _check_tokenizer_folder(dst, text_tok[0])
  # The API writes the same folder.
  demo_model.save_pretrained(tmp_path / "api", format="hf", tokenizer=text_tok[0], image_tokenizer=demo_magvit[0])
  assert sorted(os.listdir(tmp_path / "api")) == sorted(os.listdir(dst))
  for name in ("config.json",) + TOKENIZER_FILES:
    assert (tmp_path / "api" / name).read_text() == (dst / name).read_text(), name


def test_bad_inputs_leave_nothing(tiny_mmada_dir, demo_model, text_tok, demo_magvit, tmp_path):
  (tmp_path / "run").mkdir()
  assert convert_main(["export-run", str(tmp_path / "run"), str(tmp_path / "a")]) == 2    # no model/
  # A tokenizer that is not the model's: other EOS id, other codebook.
  assert convert_main(["to-hf", str(tiny_mmada_dir), str(tmp_path / "b"), "--text-tokenizer", text_tok[1]]) == 2
  assert convert_main(["to-hf", str(tiny_mmada_dir), str(tmp_path / "c"), "--image-tokenizer", demo_magvit[1]]) == 2
  (tmp_path / "bad.json").write_text("{not a tokenizer")
  assert convert_main(["to-hf", str(tiny_mmada_dir), str(tmp_path / "d"), "--text-tokenizer",
                       str(tmp_path / "bad.json")]) == 2
  for name in "abcd":
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists(), name
  with pytest.raises(ValueError, match="format='hf' only"):
    demo_model.save_pretrained(tmp_path / "e", tokenizer=text_tok[0])
  with pytest.raises(ValueError, match="codebook_size"):
    MMaDA.from_pretrained(tiny_mmada_dir).save_pretrained(tmp_path / "f", format="hf", image_tokenizer=demo_magvit[0])
  assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_tokenizer_keeps_the_fields_of_its_own_config(text_tok, tmp_path):
  src = tmp_path / "src"
  text_tok[0].save(src)
  cfg = json.loads((src / "tokenizer_config.json").read_text())
  cfg.update(model_max_length=4096, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
  (src / "tokenizer_config.json").write_text(json.dumps(cfg))
  TextTokenizer.from_file(src).save(tmp_path / "out")
  out = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
  assert out["model_max_length"] == 4096 and out["chat_template"] == cfg["chat_template"]
  assert out["added_tokens_decoder"] == cfg["added_tokens_decoder"]
