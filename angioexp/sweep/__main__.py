"""``python -m angioexp.sweep`` (the same as ``angioexp sweep``)."""

import sys

from angioexp.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
