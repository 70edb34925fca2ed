"""lm-eval's command line with the ``mmada_jax`` model registered.

  python -m mmada_jax.eval.lm_eval_cli run --model mmada_jax \\
      --model_args pretrained=DIR,tokenizer=TOK,mc_num=128 --tasks arc_challenge --batch_size 8

Every argument is lm-eval's own (``--include_path DIR`` for local task YAMLs). lm-eval finds a
model class only once its module is imported, which this wrapper does before handing over.
"""
from __future__ import annotations


def main() -> None:
  import mmada_jax.eval.lm_eval_model  # noqa: F401  (registers "mmada_jax")
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  main()
