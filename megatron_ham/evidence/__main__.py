"""python -m megatron_ham.evidence: the grid runner (grid.py)."""
import sys

from .grid import main

sys.exit(main())
