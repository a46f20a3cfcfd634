"""`python -m priorreg ...` (what `torchrun -m priorreg train ...` runs): the `priorreg` command line."""

import sys

from .cli import main

sys.exit(main())
