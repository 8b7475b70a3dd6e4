"""``python -m despina.services.perf``: the same as ``despina perf``."""

import sys

from despina.services.perf.cli import main

sys.exit(main())
