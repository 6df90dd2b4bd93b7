"""`python -m gptforge` is the `gptforge` command."""

from gptforge.cli import main

raise SystemExit(main())
