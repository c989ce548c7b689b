"""``python -m dora_tutorial.check_dora ...``: the command line."""

from dora_tutorial.check_dora.cli import main

raise SystemExit(main())
