"""`python -m vitrine` is the same as the `vitrine` console command."""

import sys

from vitrine.cli import main

sys.exit(main())
