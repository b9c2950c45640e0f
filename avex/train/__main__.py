"""``python -m avex.train ...`` and ``torchrun --nproc_per_node=N -m avex.train ...``: ``avex train classifier``."""

import sys

from avex.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
