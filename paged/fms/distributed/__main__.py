"""``python -m paged.fms.distributed`` / ``torchrun ... -m paged.fms.distributed``: the launcher (see cli.py)."""

import sys

from paged.fms.distributed.cli import main

if __name__ == "__main__":
    sys.exit(main())
