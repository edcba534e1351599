from detectflow.cli import main

raise SystemExit(main())
