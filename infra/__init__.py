"""dogflow's deployment material; ``infra.clusters`` ships the cluster profiles as package data."""
