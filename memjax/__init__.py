"""memjax: a JAX engine that scores training data.

Per-example signals, membership inference, influence and memorization, sharded over every
device it is given. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
