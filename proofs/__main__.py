"""``python -m proofs [ID ...]``: run the symbolic checks and print a table.

Columns: theorem id, what was checked, result, seconds.  Exit status 1 if any check
fails (its error is printed under the table).
"""

from __future__ import annotations

import sys
import time
import traceback

from . import load_all


def main(argv: list[str]) -> int:
    wanted = set(argv)
    proofs = [p for p in load_all() if not wanted or p.theorem in wanted]
    if wanted and not proofs:
        print(f"no proof registered for {', '.join(sorted(wanted))}", file=sys.stderr)
        return 2
    failures = []
    print("| id | checked | result | seconds |")
    print("|---|---|---|---|")
    for p in proofs:
        t0 = time.perf_counter()
        try:
            p.func()
            ok = True
        except Exception:
            ok = False
            failures.append((p, traceback.format_exc()))
        dt = time.perf_counter() - t0
        print(f"| {p.theorem} | {p.what} | {'pass' if ok else 'FAIL'} | {dt:.2f} |", flush=True)
    for p, tb in failures:
        print(f"\n{p.theorem} ({p.module}.{p.func.__name__}) failed:\n{tb}", file=sys.stderr)
    print(f"\n{len(proofs) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
