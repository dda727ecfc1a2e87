"""`python -m dfm.bench speed ...`: the same sub-commands as `dfm bench ...`."""

import sys

from dfm.bench.cli import main

sys.exit(main())
