import sys

from glymphmpi.cli import main

sys.exit(main())
