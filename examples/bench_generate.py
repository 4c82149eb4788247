"""Single-stream decode speed, ligerjax vs Transformers: ``ligerjax bench generate``."""

import sys

from ligerjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
