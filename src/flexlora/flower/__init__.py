"""Flower drivers: the only package that imports ``flwr``.

- :mod:`~flexlora.flower.strategy`: ``FlexLoRAStrategy``, any flexlora aggregator as a
  Message-API strategy that sends each node the global update at its own ranks.
- :mod:`~flexlora.flower.server_app` / :mod:`~flexlora.flower.client_app`: the apps
  (``flexlora.flower.server_app:app``, ``flexlora.flower.client_app:app``).
- :mod:`~flexlora.flower.settings`: Flower's run config -> the CLI's ``RunConfig``.
- :mod:`~flexlora.flower.records`: factors <-> ``ArrayRecord`` (numpy, no pickle), checked.

Ray (Flower's simulation engine) binds to the machine's external address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before Ray is imported; importing this package
sets it (unless it is set already), so a simulation started from Python stays on 127.0.0.1.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
