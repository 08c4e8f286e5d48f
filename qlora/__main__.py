"""`python -m qlora env`: the environment report to paste into a bug report (see qlora/env.py)."""

import argparse
import sys

from . import env

COMMANDS = {"env": env.main}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m qlora", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    sys.exit(COMMANDS[parser.parse_args().command]())
