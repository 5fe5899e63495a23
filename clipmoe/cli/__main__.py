import sys

from clipmoe.cli import main

sys.exit(main())
