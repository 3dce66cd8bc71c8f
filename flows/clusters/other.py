"""Clusters dogflow does not start: a running scheduler (``address``), or any other Dask cluster manager."""

from __future__ import annotations

from typing import Any

from flows.clusters.base import ClusterProfile, ProfileError


class AddressProfile(ClusterProfile):
    """``cluster_type: address``: join a running scheduler (``address: tcp://host:8786``)."""

    kind = "address"

    @classmethod
    def cluster_keys(cls) -> set[str]:
        return {"address"}

    def setup(self) -> None:
        if not isinstance(self.kwargs.get("address"), str):
            raise ProfileError(f"{self.name}: cluster_type address needs an 'address' "
                               "(e.g. tcp://host:8786 or a scheduler file path)")

    def runner_arguments(self) -> dict[str, Any]:
        return {"address": self.kwargs["address"]}

    def tls(self) -> str:
        return "on" if str(self.kwargs["address"]).startswith("tls://") else "as the running scheduler listens"


class ForeignProfile(ClusterProfile):
    """``cluster_type: a.dotted.ClusterClass``: any other Dask cluster manager (dask-kubernetes, Coiled, ...)
    with its own keyword arguments, which its own signature checks."""

    @property
    def cluster_class(self) -> str:  # type: ignore[override]
        return self.cluster_type
