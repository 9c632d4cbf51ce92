import sys

from experiments.benchmark.run import main

sys.exit(main())
