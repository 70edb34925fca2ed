"""Evaluation: the masked-diffusion likelihood estimator, answer scorers, benchmark readers and the
``python -m mmada_jax.eval`` command (layer 4, after ``train``)."""
