"""The ``mmada_jax`` lm-eval model class on local task YAMLs over jsonl files, with a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from mmada_jax import GenerationConfig, MMaDA  # noqa: E402
from mmada_jax.model import MMaDAConfig  # noqa: E402
from mmada_jax.prompting import SpecialTokens, train_tiny_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "yes"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """model/, tok/, tasks/ (tiny_mc.yaml, tiny_gen.yaml) and their jsonl files."""
  root = tmp_path_factory.mktemp("lmeval")
  tok = train_tiny_tokenizer(["Question: what is 2 + 3 ? Answer: 5 yes no A B C D"] * 20, vocab_size=300)
  tok.save(str(root / "tok"))
  sp = SpecialTokens.from_tokenizer(tok)
  cfg = MMaDAConfig(vocab_size=len(tok) + 64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    mask_token_id=sp.mask, eos_token_id=sp.eos, pad_token_id=sp.eos, codebook_size=64,
                    num_vq_tokens=16, max_sequence_length=128)
  gc = GenerationConfig(max_text_len=8, num_vq_tokens=16, gen_length=4, block_length=4, steps=2)
  MMaDA.init(cfg, 0, generation_config=gc).save_pretrained(root / "model")
  (root / "tasks").mkdir()
  mc = [{"question": f"what is {i} + 1 ?", "choices": ["1", "2", "3 yes"], "answer": i % 3} for i in range(3)]
  (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
  gen = [{"question": "what is " + " + ".join(["2"] * (i + 1)) + " ?", "answer": str(2 * (i + 1))} for i in range(3)]
  (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
  (root / "tasks" / "tiny_mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl"))
  (root / "tasks" / "tiny_gen.yaml").write_text(GEN_YAML.format(data=root / "gen.jsonl"))
  return root


def _evaluate(saved, batch_size: int, extra: str = "", **kw):
  import mmada_jax.eval.lm_eval_model  # noqa: F401
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(
      model="mmada_jax", model_args=f"pretrained={saved / 'model'},tokenizer={saved / 'tok'},mc_num=4,"
                                    f"mc_batch_size=2{extra}",
      tasks=["tiny_mc", "tiny_gen"], batch_size=batch_size, log_samples=True,
      task_manager=TaskManager(include_path=str(saved / "tasks")), **kw)


def _per_example(res) -> dict:
  return {task: [(s["doc_id"], json.dumps(s["resps"]), json.dumps(s["filtered_resps"])) for s in rows]
          for task, rows in res["samples"].items()}


@pytest.mark.slow
def test_simple_evaluate_both_task_kinds(saved):
  one = _evaluate(saved, 8)
  assert one["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert "exact_match,none" in one["results"]["tiny_gen"]
  mc = one["samples"]["tiny_mc"]
  assert len(mc) == 3 and all(len(s["resps"]) == 3 for s in mc)             # 3 choices each
  ll, greedy = mc[0]["resps"][0][0]
  assert ll < 0 and isinstance(greedy, bool)
  gen = one["samples"]["tiny_gen"]
  assert len(gen) == 3 and all(isinstance(s["resps"][0][0], str) for s in gen)
  assert all("\n" not in s["resps"][0][0] and "yes" not in s["resps"][0][0] for s in gen)


@pytest.mark.slow
def test_batch_size_invariance(saved):
  one, eight = _evaluate(saved, 1), _evaluate(saved, 8)
  assert _per_example(one) == _per_example(eight)
  assert one["results"] == eight["results"]


def test_model_args_errors_and_rolling(saved):
  from mmada_jax.eval.lm_eval_model import MMaDALM
  from lm_eval.api.instance import Instance
  with pytest.raises(ValueError, match="pretrained"):
    MMaDALM()
  with pytest.raises(ValueError, match="auto"):
    MMaDALM(pretrained=str(saved / "model"), tokenizer=str(saved / "tok"), batch_size="auto")
  with pytest.raises(ValueError, match="multiple"):
    MMaDALM(pretrained=str(saved / "model"), tokenizer=str(saved / "tok"), mc_num=3, mc_batch_size=2)
  lm = MMaDALM(pretrained=str(saved / "model"), tokenizer=str(saved / "tok"), mc_num=2, mc_batch_size=2)
  req = Instance("loglikelihood_rolling", {}, ("what is 2 + 3 ?",), 0)
  (ll,) = lm.loglikelihood_rolling([req])
  assert ll < 0 and lm.loglikelihood_rolling([req]) == [ll]                   # deterministic
  long = Instance("loglikelihood_rolling", {}, (" 2" * 200,), 0)
  with pytest.raises(ValueError, match="rolling windows"):
    lm.loglikelihood_rolling([long])
  bad = Instance("generate_until", {}, ("what", {"until": ["\n"], "top_p": 0.9}), 0)
  with pytest.raises(ValueError, match="top_p"):
    lm.generate_until([bad])


@pytest.mark.slow
def test_command_line(saved, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "mmada_jax.eval.lm_eval_cli", "run", "--model", "mmada_jax", "--model_args",
       f"pretrained={saved / 'model'},tokenizer={saved / 'tok'},mc_num=2,mc_batch_size=2",
       "--tasks", "tiny_mc", "--include_path", str(saved / "tasks"), "--batch_size", "2",
       "--output_path", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "tiny_mc" in out.stdout


def test_chat_template_interface(saved):
  from mmada_jax.eval.lm_eval_model import MMaDALM
  from mmada_jax.prompting.text_tokenizer import CHAT_TEMPLATE
  lm = MMaDALM(pretrained=str(saved / "model"), tokenizer=str(saved / "tok"), mc_num=2, mc_batch_size=2)
  tok = lm.tokenizer
  chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3 ?"}]
  text = lm.apply_chat_template(chat)
  assert text == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\nbe brief<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\nwhat is 2 + 3 ?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n")
  prefill = lm.apply_chat_template(chat + [{"role": "assistant", "content": "It is"}], add_generation_prompt=False)
  assert prefill.endswith("<|start_header_id|>assistant<|end_header_id|>\nIt is")
  assert lm.chat_template(True) == CHAT_TEMPLATE and lm.chat_template(False) is None
  with pytest.raises(ValueError, match="not available"):
    lm.chat_template("chatml")
  assert lm.tokenizer_name == str(saved / "tok").replace("/", "__")
  # the rendered context keeps its one BOS: the ids are the chat template's
  ctx, cont = lm._context_ids(text, " 5")
  assert ctx == tok.apply_chat_template(chat) and cont == tok.encode(" 5", add_special_tokens=False)
  assert lm._context_ids("what", " 5")[0] == [lm.specials.bos] + tok.encode("what", add_special_tokens=False)


@pytest.mark.slow
def test_simple_evaluate_with_chat_template(saved):
  from mmada_jax.eval import batching
  res = _evaluate(saved, 2, apply_chat_template=True)
  gen = res["samples"]["tiny_gen"]
  context = gen[0]["arguments"][0][0]
  assert context.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\nQuestion: what is 2 ?")
  assert context.endswith("<|start_header_id|>assistant<|end_header_id|>\n")
  # the sampler saw exactly the chat template's ids
  from mmada_jax.eval.lm_eval_model import MMaDALM
  lm = MMaDALM(pretrained=str(saved / "model"), tokenizer=str(saved / "tok"))
  ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Question: what is 2 ?\nAnswer:"}])
  assert batching.prompt_ids(lm.tokenizer, context, chat=False) == ids
  toks = batching.generate_unpadded(lm.model, [ids], batch_size=1, gen_length=4, block_length=4, steps=4,
                                    temperature=0.0, seed=0)
  want = batching.decode(lm.model, lm.tokenizer, toks)[0]
  assert gen[0]["resps"][0][0] == want.split("\n")[0].split("yes")[0]
  assert res["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
