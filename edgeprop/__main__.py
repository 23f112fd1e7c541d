"""`python -m edgeprop`: the CLI. Importing this module runs nothing."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
