"""The JAX CLIP and the CLIP score: :mod:`mmada_jax.scorers.clip` (moved to layer 2 so that UniGRPO's
rewards can use it); re-exported here for the evaluation harness."""
from mmada_jax.scorers.clip import CLIP, MEAN, STD, ImageTextScorer, preprocess, preprocess_device

__all__ = ["CLIP", "MEAN", "STD", "ImageTextScorer", "preprocess", "preprocess_device"]
