import sys

from angioexp.cli import main

sys.exit(main())
