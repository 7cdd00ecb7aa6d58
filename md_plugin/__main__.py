"""``python -m md_plugin diagnose|sift-low|masks|report ...`` (same as ``md-doctor``)."""

import sys

from .cli import main

sys.exit(main())
