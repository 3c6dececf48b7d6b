import os
import sys

if __package__:  # python -m bench (from the repository root, or after pip install -e .)
    from .cli import main
else:  # python path/to/bench ... from any folder: the repository root is this folder's parent
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]  # bench/ is no top level
    sys.path.insert(0, os.path.dirname(here))
    from bench.cli import main

sys.exit(main())
