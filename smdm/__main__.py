import sys

from smdm.cli import main

sys.exit(main())
