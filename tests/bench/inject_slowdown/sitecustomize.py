"""Test harness only: a slowdown injected into every process started with this folder on PYTHONPATH.

Python imports ``sitecustomize`` at start-up, so the benchmark's workers (which inherit PYTHONPATH) get
``GossipAverager.step`` patched to sleep ``LG_TEST_INJECT_STEP_SLEEP_MS`` milliseconds first: the regression a
reviewer injects by editing the code, which ``lightning_gossip.bench --compare`` must catch. Nothing in the package
reads that variable or this folder; tests/bench puts the folder on PYTHONPATH for the injected run only.
"""

import os
import time

_SLEEP_S = float(os.environ.get("LG_TEST_INJECT_STEP_SLEEP_MS", "0")) / 1e3

if _SLEEP_S > 0:
    from lightning_gossip.gossip.averager import GossipAverager

    _step = GossipAverager.step

    def _slow_step(self, *args, **kwargs):
        time.sleep(_SLEEP_S)
        return _step(self, *args, **kwargs)

    GossipAverager.step = _slow_step
