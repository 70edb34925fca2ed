"""The demo's text-to-image reward: its digit classifier as the image-text scorer."""
from __future__ import annotations

from typing import Any

from mmada_jax.demo.classifier import DigitClassifier
from mmada_jax.rl import rewards as rew_lib


def t2i_rewards(config: Any, model_cfg: Any) -> list[rew_lib.RewardFn]:
  """``rl.rewards_factory`` for ``configs/demo.py:grpo_t2i``: the probability that the classifier
  gives the digit the prompt asks for (the prompt file's ``label``; ``config.demo.classifier`` is
  the classifier's pickle)."""
  del model_cfg
  clf = DigitClassifier.load(str(config.demo.classifier))
  return [rew_lib.ClassifierReward(clf.predict_proba, weight=1.0, name="digit_classifier")]
