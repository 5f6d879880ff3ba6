"""``python -m floatscope`` is the ``floatscope`` command."""

import sys

from floatscope._cli.main import main

sys.exit(main())
