import sys

from flowscope.cli import main

sys.exit(main())
