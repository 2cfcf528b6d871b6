import sys

from bbr.cli import main

sys.exit(main())
