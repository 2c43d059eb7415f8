from lipsync.apps.cli import run

run()
