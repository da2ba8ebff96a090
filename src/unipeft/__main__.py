"""`python -m unipeft ...`: the same command line as the `unipeft` script."""
from .cli import main

raise SystemExit(main())
