from featx.cli import main

raise SystemExit(main())
