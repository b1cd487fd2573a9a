"""``python -m certattn``: the ``certattn`` command line (:func:`certattn.cli.main`)."""

from __future__ import annotations

import sys

from certattn.cli import main

sys.exit(main())
