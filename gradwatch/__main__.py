"""``python -m gradwatch``: the same as the ``gradwatch`` command."""

import sys

from .cli import main

sys.exit(main())
