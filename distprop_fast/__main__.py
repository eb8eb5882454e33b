from distprop_fast.cli import main

raise SystemExit(main())
