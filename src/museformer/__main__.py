"""``python -m museformer`` is the same as the ``museformer`` command."""

from museformer.cli import main

raise SystemExit(main())
