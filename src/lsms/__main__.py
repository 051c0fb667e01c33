import sys

from lsms.cli import main

sys.exit(main())
