"""The one harness every test uses to run real processes: ``distributed`` (a function on several gloo ranks) and
``processes`` (a script or module in its own process group, with hard timeouts and a check that nothing survives)."""
