"""`python -m lminfinite.cli`: the same as the `lminfinite` command."""

import sys

from . import main

sys.exit(main())
