"""``python -m mmada_jax.parity DIR [DIR ...] [--json]``: see ``mmada_jax.parity``."""
import sys

from mmada_jax.parity import main

sys.exit(main())
