"""The model-free round logic both drivers share: :mod:`flexlora.federation.round`."""
