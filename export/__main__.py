import sys

from lipsync.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
