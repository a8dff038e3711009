"""`python -m pelthub` is the `pelthub` command line."""
import sys

from .cli import main

sys.exit(main())
