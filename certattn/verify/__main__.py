"""``python -m certattn.verify``: the same as ``certattn verify``.

Runs :func:`certattn.cli.main` with ``verify`` and the process arguments and exits with
its status (0 when every check passes, 1 when one fails, 2 on bad usage).
"""

from __future__ import annotations

import sys

from certattn.cli import main

sys.exit(main(["verify", *sys.argv[1:]]))
