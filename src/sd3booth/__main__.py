from sd3booth.cli import main

raise SystemExit(main())
