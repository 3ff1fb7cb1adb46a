"""python -m lowbit: the command line (lowbit/cli.py)."""
import sys

from .cli import main

sys.exit(main())
