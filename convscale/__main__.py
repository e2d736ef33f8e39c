import sys

from convscale.cli.main import main

sys.exit(main())
