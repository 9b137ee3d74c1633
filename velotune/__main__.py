import sys

from velotune.cli.main import main

sys.exit(main())
