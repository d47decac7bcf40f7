#!/usr/bin/env python
"""Convert a megatron-ham checkpoint to a Hugging Face model directory.

Same as the `ham-convert-hf` console script (megatron_ham.hf.convert:main); run
`python tools/convert_to_hf.py --help` for the options and docs/export.md for the details.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ham.hf.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
