"""``python -m crln`` (also what ``torchrun -m crln`` runs)."""

import sys

from crln.cli import main

sys.exit(main())
