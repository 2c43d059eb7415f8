import sys

from lipsync.apps.cli import main

sys.exit(main())
