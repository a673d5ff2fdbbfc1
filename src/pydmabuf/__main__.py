"""``python -m pydmabuf``: the ``pydmabuf`` command, for environments where
the console script is not on ``PATH``."""

import sys

from pydmabuf.cli import main

if __name__ == "__main__":  # importing the module (stubtest, pydoc) runs nothing
    sys.exit(main())
