"""Reliability tests: real processes, signals, faults and bad input."""

from pathlib import Path

#: the scripts these tests run as real process trees (tests.helpers.processes.run_script)
SCRIPTS = Path(__file__).resolve().parent / "scripts"
