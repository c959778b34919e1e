"""``python -m ssl_lightning fit --config experiments/<EXP>.yaml [overrides]``."""

import sys

from ssl_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
