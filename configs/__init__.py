"""Experiment configs (``get_config(arg)`` files for ``--config=configs/<file>.py:<arg>``).

Installed as the package ``mmada_jax.configs`` (setup.py maps it to this folder), so the files
import each other as ``from mmada_jax.configs import common`` and a wheel install finds them from
any working directory.
"""
