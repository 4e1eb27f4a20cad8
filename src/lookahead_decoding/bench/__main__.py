"""`python -m lookahead_decoding.bench ARGS` = `lookahead bench ARGS`."""

import sys

from .cli import main

sys.exit(main())
