import sys

from mchar.cli import main

sys.exit(main())
