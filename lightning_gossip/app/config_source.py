"""Where ``python -m lightning_gossip.train`` finds its Hydra configs.

The configs exist once, in the repository's top-level ``conf/``. A wheel or ``pip install .`` ships that folder
inside the package as ``lightning_gossip.conf`` (pyproject.toml maps the package to ``conf/``), and the installed app
loads ``pkg://lightning_gossip.conf``, from any working directory. Run from a source tree (a checkout on
``PYTHONPATH``, or an editable install, both of which import the package from the checkout) the package folder has no
``conf/`` inside, and the configs are the checkout's ``conf/`` beside it: always the configs of the code that runs,
even where another copy of the package is installed as well.

A user adds configs of their own with Hydra's ``--config-dir DIR`` (``-cd DIR``): files there are found before
the shipped ones, so ``DIR/strategy/mine.yaml`` is selected with ``strategy=mine`` and ``DIR/train.yaml`` replaces the
top-level config. ``hydra.searchpath=[file:///abs/DIR]`` on the command line (or in a config) adds folders behind it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CONFIG_PACKAGE = "lightning_gossip.conf"
CONFIG_NAME = "train"

# lightning_gossip/app/config_source.py -> lightning_gossip/
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def config_path() -> str:
    """The primary config location for ``hydra.main``: ``pkg://lightning_gossip.conf`` or a checkout's ``conf/``."""
    if (_PACKAGE_DIR / "conf" / f"{CONFIG_NAME}.yaml").is_file():
        return f"pkg://{CONFIG_PACKAGE}"  # installed: the configs shipped inside the package
    checkout = _PACKAGE_DIR.parent
    if (checkout / "conf" / f"{CONFIG_NAME}.yaml").is_file() and (checkout / "pyproject.toml").is_file():
        return str(checkout / "conf")  # a source tree: its own conf/
    if importlib.util.find_spec(CONFIG_PACKAGE) is not None:
        return f"pkg://{CONFIG_PACKAGE}"  # installed some other way (a zip, a custom importer)
    raise FileNotFoundError(
        f"The Hydra configs of lightning_gossip were not found: neither {_PACKAGE_DIR / 'conf'} (an installed "
        f"package) nor {checkout / 'conf'} (a checkout) holds {CONFIG_NAME}.yaml, and {CONFIG_PACKAGE} cannot be "
        "imported. Reinstall the package (pip install lightning-gossip, or pip install . in a checkout)."
    )
