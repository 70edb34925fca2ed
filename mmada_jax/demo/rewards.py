"""The demo's text-to-image reward: its digit classifier as the image-text scorer."""
from __future__ import annotations

import dataclasses
from typing import Any

from mmada_jax.config_schema import parse
from mmada_jax.demo.classifier import DigitClassifier
from mmada_jax.rl import rewards as rew_lib


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The ``config.demo`` section (``configs/demo.py:grpo`` and ``grpo_t2i``): ``classifier``, the pickle of
  the demo's digit classifier that scores the generated images."""
  classifier: str = ""


def t2i_rewards(config: Any, model_cfg: Any) -> list[rew_lib.RewardFn]:
  """The ``rl.rewards`` entry ``mmada_jax.demo.rewards:t2i_rewards`` of ``configs/demo.py:grpo_t2i``: the probability that the classifier
  gives the digit the prompt asks for (the prompt file's ``label``; ``config.demo.classifier`` is
  the classifier's pickle)."""
  del model_cfg
  demo = parse(DemoConfig, config.demo, "config.demo")
  if not demo.classifier:
    raise ValueError("config.demo.classifier is empty: the demo's t2i rewards need the classifier's pickle")
  clf = DigitClassifier.load(demo.classifier)
  return [rew_lib.ClassifierReward(clf.predict_proba, weight=1.0, name="digit_classifier")]
