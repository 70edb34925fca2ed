"""Experiment configs (``get_config(arg)`` files for ``--config=configs/<file>.py:<arg>``)."""
