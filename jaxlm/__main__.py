import sys

from jaxlm.cli import console_main

sys.exit(console_main())
