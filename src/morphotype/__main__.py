import sys

from morphotype.cli import main

sys.exit(main())
