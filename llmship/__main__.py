from llmship.cli import main

raise SystemExit(main())
