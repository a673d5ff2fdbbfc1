"""``python -m pydmabuf``: the ``pydmabuf`` command, for environments where
the console script is not on ``PATH``."""

import sys

from pydmabuf.cli import main

sys.exit(main())
