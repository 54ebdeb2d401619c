"""``python -m service.cli``: the ``eqm`` command."""
import sys

from service.cli import main

sys.exit(main())
