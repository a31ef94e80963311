"""`python -m qlora_ext ...` is the `qlora-ext` command line."""
import sys

from .cli import main

sys.exit(main())
