import sys

from lightning_gossip.bench.cli import main

sys.exit(main())
