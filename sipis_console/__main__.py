"""``python -m sipis_console``: the same as the ``sipis-console`` command (the SSH server's console child runs it)."""

import sys

from sipis_console.cli import main

sys.exit(main())
