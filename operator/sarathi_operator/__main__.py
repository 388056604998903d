"""`python -m sarathi_operator`: the same as `sarathi operator`."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
