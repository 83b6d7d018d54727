import sys

from tierswap.cli import main

sys.exit(main())
