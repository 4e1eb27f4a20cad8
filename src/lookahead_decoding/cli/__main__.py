"""`python -m lookahead_decoding.cli ARGS` = `lookahead ARGS`."""

import sys

from . import main

sys.exit(main())
