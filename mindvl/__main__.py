"""`python -m mindvl ...` runs the command line."""

import sys

from mindvl.apps.cli import main

sys.exit(main())
