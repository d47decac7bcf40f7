"""Run ham-prep-data (data_prep.cli) and SIGKILL it at a chosen point: the resumption tests'
fault injection, from outside the pipeline (it carries no test hooks).

    python tests/_prep_killed.py blocks=N|files=N CLI_ARGS...

blocks=N  right after the N-th block of tokens went into an output file (_FileWriter.add);
files=N   right after .work/state.json records N finished input files of a component.
"""
from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import cli, pipeline  # noqa: E402


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    what, n = sys.argv[1].split("=")
    n = int(n)
    if what == "blocks":
        add, count = pipeline._FileWriter.add, [0]

        def counted_add(self, *args, **kwargs):
            add(self, *args, **kwargs)
            count[0] += 1
            if count[0] >= n:
                _kill()

        pipeline._FileWriter.add = counted_add
    elif what == "files":
        write = pipeline._atomic_write_json

        def watched_write(path, obj):
            write(path, obj)
            if os.path.basename(path) == "state.json" and max(
                    (len(c.get("files", {})) for c in obj["components"].values()), default=0) >= n:
                _kill()

        pipeline._atomic_write_json = watched_write
    else:
        raise SystemExit(f"{sys.argv[1]!r}: expected blocks=N or files=N")
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
