"""The shipped cluster profiles (``*.yaml``), read with ``importlib.resources`` by ``flows.clusters``."""
