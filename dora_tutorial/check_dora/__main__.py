"""``python -m dora_tutorial.check_dora ...``: the command line."""

import sys

from dora_tutorial.check_dora import main

sys.exit(main())
