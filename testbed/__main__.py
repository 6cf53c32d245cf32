"""Entry point: `python -m testbed ...` (see testbed/cli.py)."""

import sys

from testbed.cli import main

sys.exit(main())
