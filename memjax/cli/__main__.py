"""``python -m memjax.cli``: the ``memjax`` command."""

import sys

from memjax.cli import main

sys.exit(main())
