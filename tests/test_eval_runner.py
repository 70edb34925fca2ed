"""``python -m mmada_jax.eval`` end to end on a tiny random model: outputs, metrics and resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
from mmada_jax.eval import runner
from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
from mmada_jax.model import MMaDAConfig
from mmada_jax.prompting import SpecialTokens, train_tiny_tokenizer
from mmada_jax.train.config_files import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_BITS = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A folder with model/, tok/, itok/ and the benchmark files gsm8k.jsonl, mmlu.jsonl, pope.jsonl."""
  root = tmp_path_factory.mktemp("eval")
  tok = train_tiny_tokenizer(["Question: what is 2 + 3 ? Answer: 5 #### yes no A B C D"] * 20, vocab_size=300)
  tok.save(str(root / "tok"))
  sp = SpecialTokens.from_tokenizer(tok)
  vq = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(), z_channels=CODE_BITS,
                   resolution=8)
  ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, codebook_dim=CODE_BITS), 0).save_pretrained(root / "itok")
  cfg = MMaDAConfig(vocab_size=len(tok) + 2 ** CODE_BITS, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                    mlp_hidden_size=64, mask_token_id=sp.mask, eos_token_id=sp.eos, pad_token_id=sp.eos,
                    codebook_size=2 ** CODE_BITS, num_vq_tokens=16, max_sequence_length=256)
  gc = GenerationConfig(max_text_len=8, num_vq_tokens=16, gen_length=4, block_length=4, steps=2)
  MMaDA.init(cfg, 0, generation_config=gc).save_pretrained(root / "model")
  rows = [{"question": f"what is {i} + 3 ?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"} for i in range(5)]
  (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rows = [{"question": f"what is {i} + 1 ?", "choices": ["1", "2", "3", "4"], "answer": i % 4, "subject": "math"}
          for i in range(3)]
  (root / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "img").mkdir()
  for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
  rows = [{"image": f"img/{i}.png", "question": "is there a dog ?", "answer": ["yes", "no"][i % 2]} for i in range(3)]
  (root / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root


def _config(root, task: str, **kw):
  c = load_config_file(f"configs/eval.py:{task}")
  c.model, c.text_tokenizer, c.image_tokenizer = str(root / "model"), str(root / "tok"), str(root / "itok")
  c.data = str(root / f"{task}.jsonl")
  for k, v in kw.items():
    c[k] = v
  return c


def _samples(workdir) -> list[dict]:
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_generation_task_outputs_and_resume(saved, tmp_path):
  settings = dict(gen_length=4, block_length=4, steps=2, batch_size=2, num_fewshot=1,
                  fewshot_data=str(saved / "gsm8k.jsonl"))
  full = runner.run(_config(saved, "gsm8k", **settings), str(tmp_path / "full"))
  assert full["task"] == "gsm8k" and full["n"] == 5 and set(full["metrics"]) == {"accuracy"}
  assert set(full) >= {"metrics", "stderr", "settings", "model", "wall_s", "tokens_per_s"}
  assert full["settings"]["gen_length"] == 4 and len(full["model"]["params_hash"]) == 32
  with open(tmp_path / "full" / "results.json") as f:
    assert json.load(f)["metrics"] == full["metrics"]
  rows = _samples(tmp_path / "full")
  assert [r["index"] for r in rows] == list(range(5)) and all(set(r) >= {"prompt", "output", "target", "score"}
                                                              for r in rows)
  assert rows[0]["prompt"].startswith("Question: what is 0 + 3 ?\nAnswer: 0 + 3 = 3\n#### 3\n\nQuestion: what is 0")
  assert rows[2]["target"] == "5"

  # Interrupted after the first batch: the rerun redoes only the rest and gives the same samples.
  class Stop(Exception):
    pass

  def stop(b):
    raise Stop
  with pytest.raises(Stop):
    runner.run(_config(saved, "gsm8k", **settings), str(tmp_path / "cut"), on_batch=stop)
  assert len(_samples(tmp_path / "cut")) == 2
  batches = []
  again = runner.run(_config(saved, "gsm8k", **settings), str(tmp_path / "cut"), on_batch=batches.append)
  assert batches == [0, 1] and again["resumed"] == 2                   # 3 examples left: 2 batches
  assert _samples(tmp_path / "cut") == rows and again["metrics"] == full["metrics"]
  # A limit, then the rest; other settings in the same workdir are refused.
  runner.run(_config(saved, "gsm8k", limit=2, **settings), str(tmp_path / "lim"))
  assert len(_samples(tmp_path / "lim")) == 2
  with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
    runner.run(_config(saved, "gsm8k", seed=1, **settings), str(tmp_path / "lim"))


def test_likelihood_and_image_tasks(saved, tmp_path, capsys):
  res = runner.run(_config(saved, "mmlu", num_fewshot=0, batch_size=4), str(tmp_path / "mmlu"))
  rows = _samples(tmp_path / "mmlu")
  assert res["n"] == 3 and set(res["metrics"]) == {"accuracy", "accuracy_norm"}
  assert all(len(r["loglik"]) == 4 and r["output"] in "ABCD" for r in rows)
  assert [r["target"] for r in rows] == ["A", "B", "C"] and rows[0]["prompt"].endswith("D. 4\nAnswer:")
  assert res["metrics"]["accuracy"] == np.mean([r["score"] for r in rows])
  tq = [{"question": f"is {i} one ?", "mc1_targets": {"choices": ["no", "yes"], "labels": [1, 0]},
         "mc2_targets": {"choices": ["no", "A", "yes"], "labels": [1, 1, 0]}} for i in range(2)]
  (tmp_path / "tq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tq))
  res = runner.run(_config(saved, "truthfulqa", data=str(tmp_path / "tq.jsonl"), mc_num=2, batch_size=2),
                   str(tmp_path / "tq"))
  rows = _samples(tmp_path / "tq")
  assert set(res["metrics"]) == {"accuracy", "mc2"} and len(rows[0]["loglik"]) == 2 and 0 < rows[0]["mc2"] < 1
  assert rows[0]["prompt"].endswith("Q: is 0 one ?\nA:") and res["settings"]["cfg"] == 2.0
  res = runner.run(_config(saved, "pope", batch_size=2), str(tmp_path / "pope"))
  assert res["n"] == 3 and set(res["metrics"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
  assert "| accuracy |" in runner.markdown(res)


def test_bad_config_and_data(saved, tmp_path):
  with pytest.raises(ValueError, match="num_fewshot=5 needs config.fewshot_data"):
    runner.run(_config(saved, "gsm8k"), str(tmp_path / "a"))
  c = _config(saved, "gsm8k", num_fewshot=0)
  c.data = str(saved / "mmlu.jsonl")
  with pytest.raises(ValueError, match=r"mmlu\.jsonl: record 0: field 'answer' must be a string, got int"):
    runner.run(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="name a task first"):
    load_config_file("configs/eval.py:nope")


def test_command_line(saved, tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "mmada_jax.eval", "--config=configs/eval.py:pope,batch_size=3",
         f"--config.model={saved / 'model'}", f"--config.text_tokenizer={saved / 'tok'}",
         f"--config.image_tokenizer={saved / 'itok'}", f"--config.data={saved / 'pope.jsonl'}",
         f"--workdir={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| accuracy |" in proc.stdout and (out / "results.json").exists()
  bad = subprocess.run(cmd[:-1] + ["--config.bogus=1", f"--workdir={out}"], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "bogus" in bad.stderr


@pytest.mark.slow  # 18 s: fast tier < 4 min; CI's slow tier runs it
def test_generation_outputs_do_not_depend_on_batch_size_or_mesh(saved, tmp_path):
  # prompt lengths: 8 of 18 tokens (one full chunk of 8, split over the 8 devices), 3 of 17, 10 of 19
  rows = [{"question": f"what is {i} + 3 ?", "answer": f"#### {i + 3}"} for i in range(21)]
  (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  base = dict(gen_length=4, block_length=4, steps=2, num_fewshot=0, data=str(tmp_path / "gsm8k.jsonl"))
  runs = {}
  for name, kw in {"bs1": dict(batch_size=1), "bs8": dict(batch_size=8),
                   "data8": dict(batch_size=8, mesh_shape="data=8"),
                   "fsdp8": dict(batch_size=8, mesh_shape="fsdp=8")}.items():
    res = runner.run(_config(saved, "gsm8k", **base, **kw), str(tmp_path / name))
    runs[name] = [(r["index"], r["output"], r["score"]) for r in _samples(tmp_path / name)]
    assert res["n"] == 21
  assert len(runs["bs1"]) == 21 and len({o for _, o, _ in runs["bs1"]}) > 1
  for name in ("bs8", "data8", "fsdp8"):
    assert runs[name] == runs["bs1"], name
  ec = runner.parse(runner.EvalConfig, _config(saved, "gsm8k", **base, mesh_shape="data=8"), "config")
  lo = runner.on_mesh(ec, runner.load(ec))
  assert dict(lo.model.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  # the mesh does not enter the resume check: a one-device run continues on the mesh
  res = runner.run(_config(saved, "gsm8k", **base, batch_size=8, mesh_shape="data=8"), str(tmp_path / "bs8"))
  assert res["resumed"] == 21 and runs["bs8"] == [(r["index"], r["output"], r["score"]) for r in _samples(tmp_path / "bs8")]


def _port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two jax.distributed processes per task
@pytest.mark.parametrize("task,kw", [("gsm8k", dict(gen_length=4, block_length=4, steps=2, num_fewshot=0,
                                                   batch_size=2)),
                                     ("mmlu", dict(num_fewshot=0, mc_num=2, batch_size=2)),
                                     ("pope", dict(batch_size=2)),
                                     ("geneval", dict(steps=2, n_samples=1, cfg=1.0))])
def test_two_processes_match_one_process(saved, tmp_path, task, kw):
  """2 local jax.distributed processes (2 devices each, data=-1 mesh) give the same samples.jsonl
  and metrics as one process on one device; the run resumes the row that a 1-process run with a
  limit made before, and leaves only the final files."""
  if task == "geneval":
    (saved / "geneval.jsonl").write_text("".join(json.dumps({"prompt": f"a {c} dog", "tag": "color"}) + "\n"
                                                 for c in ("red", "blue", "green")))
  ref = runner.run(_config(saved, task, **kw), str(tmp_path / "one"))
  out = tmp_path / "two"
  runner.run(_config(saved, task, limit=1, **kw), str(out))               # one example done before
  port = _port()
  args = [f"--config=configs/eval.py:{task}", f"--config.model={saved / 'model'}",
          f"--config.text_tokenizer={saved / 'tok'}", f"--config.image_tokenizer={saved / 'itok'}",
          f"--config.data={saved / f'{task}.jsonl'}", "--config.mesh_shape=data=-1", f"--workdir={out}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  args += [f"--config.{k}={v}" for k, v in kw.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, "-m", "mmada_jax.eval", *args, f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert "| value |" in logs[0] and "| value |" not in logs[1]            # process 0 prints the table
  with open(out / "results.json") as f:
    two = json.load(f)
  assert two["metrics"] == ref["metrics"] and two["stderr"] == ref["stderr"] and two["n"] == ref["n"]
  assert two["processes"] == 2 and two["resumed"] == 1
  got, want = _samples(out), _samples(tmp_path / "one")
  # log-likelihoods on a 2-device mesh agree with one device to float rounding (other matmul shapes)
  np.testing.assert_allclose([r.pop("loglik", 0.0) for r in got], [r.pop("loglik", 0.0) for r in want], rtol=1e-5)
  assert got == want
  assert sorted(p.name for p in out.iterdir()) == (["images"] if task == "geneval" else []) + [
      "results.json", "run.json", "samples.jsonl"]
  if task == "geneval":                                                    # GenEval's layout, same pixels
    for i in range(3):
      png = f"images/{i:05d}/samples/0000.png"
      assert (out / png).read_bytes() == (tmp_path / "one" / png).read_bytes()


@pytest.mark.slow  # ~20 s of compiles: fast tier < 4 min
def test_image_understanding_outputs_do_not_depend_on_batch_size_or_mesh(saved, tmp_path):
  # 11 questions of three token lengths over 3 images: batches mix lengths and images
  qs = ["is there a dog ?", "is there a cat here ?", "is it yes ?"]
  rows = [{"image": str(saved / "img" / f"{i % 3}.png"), "question": qs[i % 3] + " no" * (i // 6),
           "answer": ["yes", "no"][i % 2]} for i in range(11)]
  (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # the random model's weights ×3: its answers then depend on the image and the question
  import jax
  m = MMaDA.from_pretrained(saved / "model")
  MMaDA(jax.tree_util.tree_map(lambda x: x * 3, m.params), m.config,
        generation_config=m.generation_config).save_pretrained(tmp_path / "sharp")
  base = dict(data=str(tmp_path / "pope.jsonl"), model=str(tmp_path / "sharp"), gen_length=4, block_length=4, steps=2)
  runs = {}
  for name, kw in {"bs1": dict(batch_size=1), "bs8": dict(batch_size=8),
                   "data8": dict(batch_size=8, mesh_shape="data=8")}.items():
    runner.run(_config(saved, "pope", **base, **kw), str(tmp_path / name))
    runs[name] = [(r["index"], r["output"], r["score"]) for r in _samples(tmp_path / name)]
  assert len(runs["bs1"]) == 11 and len({o for _, o, _ in runs["bs1"]}) > 3
  assert runs["bs8"] == runs["bs1"] and runs["data8"] == runs["bs1"]
  # one example alone: the harness's unpadded prompt is MMaDA.answer's layout
  ec = runner.parse(runner.EvalConfig, _config(saved, "pope", **base), "config")
  lo = runner.load(ec)
  ex = runner.data.read_examples("pope", base["data"])[4]
  out = lo.model.answer(runner._image_array(ex, lo)[None], [runner.render("pope", ex, [])],
                        image_tokenizer=lo.image_tokenizer, tokenizer=lo.tokenizer, **runner._sampler_kwargs(ec))
  assert out.texts[0] == runs["bs1"][4][1]
