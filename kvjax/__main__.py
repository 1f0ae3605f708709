"""``python -m kvjax``: the ``kvjax`` command (``kvjax.cli.main``)."""

import sys

from kvjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
