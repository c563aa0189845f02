import sys

from s1_mini.deploy.cli import main

sys.exit(main())
