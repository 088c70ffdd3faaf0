import sys

from specjax.harness.cli import main

sys.exit(main())
