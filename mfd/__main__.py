import sys

from mfd.cli import main

sys.exit(main())
