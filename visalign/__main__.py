"""``python -m visalign`` (used by ``accelerate launch -m visalign``)."""

import sys

from .cli import main

sys.exit(main())
