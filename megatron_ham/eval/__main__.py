"""python -m megatron_ham.eval == ham-eval."""
import sys

from .cli import main

sys.exit(main())
