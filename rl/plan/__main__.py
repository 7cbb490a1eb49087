"""`python -m rl.plan CONFIG.yaml [...]`: see rl/plan/__init__.py and rl/plan/cli.py."""

import sys

from rl.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
