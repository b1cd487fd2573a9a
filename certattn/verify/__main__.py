"""``python -m certattn.verify``: the ``certattn verify`` command line.

Runs :func:`certattn.verify.main` on the process arguments and exits with its status (0
when every check passes, 1 when one fails, 2 on bad usage).
"""

from __future__ import annotations

import sys

from ._runner import main

sys.exit(main())
