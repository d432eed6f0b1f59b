import sys

from aegis_edge_cli import main

sys.exit(main())
