"""`python -m edgeprop`: the CLI. Importing this module runs nothing. The program's entry
point, not part of the core: the one module here allowed to reach up (to edgeprop.cli)."""
import sys

from edgeprop.cli import main

if __name__ == "__main__":
    sys.exit(main())
