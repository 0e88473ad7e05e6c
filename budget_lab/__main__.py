import sys

from budget_lab.cli import main

sys.exit(main())
