"""``python -m dfm ...`` is the ``dfm`` command (also for ``torchrun ... -m dfm train ...``)."""

import sys

from dfm.cli import main

if __name__ == "__main__":
    sys.exit(main())
