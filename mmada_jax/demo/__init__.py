"""Pieces of the offline CPU demo (handwritten digits + arithmetic), everything before MMaDA training.

Modules: ``digits`` (scikit-learn's bundled 8×8 digits, upscaled, captions, MMU turns),
``arithmetic`` (problems with ``<think> … </think> answer`` CoT), ``tokenizers`` (tiny BPE and a
tiny MAGVIT-v2 trained on the digits), ``classifier`` (digit classifier for judging samples),
``data`` (``build_demo_data``: all files in the data pipeline's formats, ``data_config``,
``demo_model_config``) and ``evaluate`` (t2i / MMU / arithmetic scores, image grids).
"""
