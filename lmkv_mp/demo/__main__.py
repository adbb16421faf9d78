"""``python -m lmkv_mp.demo``: see :mod:`lmkv_mp.demo.demo`."""

import sys

from lmkv_mp.demo.demo import main

sys.exit(main())
