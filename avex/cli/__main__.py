import sys

from avex.cli import main

sys.exit(main())
