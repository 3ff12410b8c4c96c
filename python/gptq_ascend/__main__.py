"""`python -m gptq_ascend`: the `gptq-ascend` command (cli.py) without the console script."""

import sys

from .cli import main

sys.exit(main())
