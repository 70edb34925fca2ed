"""Image–text scorers in JAX (layer 2): the CLIP model and the CLIP score (:mod:`.clip`), and the
ImageReward-style preference head over CLIP embeddings (:mod:`.preference`). Used by UniGRPO's
image rewards (on the devices) and by the evaluation harness (``mmada_jax.eval.clip`` re-exports
:mod:`.clip`). Nothing here downloads; checkpoints are local files.
"""
