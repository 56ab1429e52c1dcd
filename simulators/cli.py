"""`metersim` command line (the fleet arrives with the simulator issue)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    print(f"metersim {' '.join(args) or ''}: not available yet in this version".replace("  ", " "),
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
