"""``python -m atlas_kernels.task_vectors import|build|convert|info``: the command line (cli.py)."""
from .cli import main

raise SystemExit(main())
