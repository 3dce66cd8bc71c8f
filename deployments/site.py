"""Site values -> a copy of prefect.yaml with them filled in (used by deployments/deploy.sh).

    python deployments/site.py OUT.yaml        # reads DOGFLOW_* from the environment

``prefect.yaml`` carries literal working defaults and deploys as it is. A site overrides
them with ``DOGFLOW_*`` values (a site env file read by deploy.sh, or the environment);
this writes the overridden copy, which deploy.sh passes to
``prefect --no-prompt deploy --all --prefect-file OUT.yaml``. Only the values given are
changed. Bad values are refused here, in one line, before anything is deployed.

The site values are the site parameters of ``flows/params.py`` (``DOGFLOW_<NAME>``; ``DOGFLOW_CHANNEL``
still means ``DOGFLOW_CHANNELS``). Values are parsed as JSON when they are valid JSON (``0``, ``21.3``,
``[8, 21.3, 21.3]``), else kept as text (``0,2``, ``all``, ``2,0.406,0.406``, ``0.5um``, paths); text
parameters get the text form (``[8, 21.3, 21.3]`` -> ``"8,21.3,21.3"``). ``DOGFLOW_CLUSTER`` takes a
shipped profile name (``cluster``) or a YAML path (``cluster_file``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

ROOT = Path(__file__).resolve().parent.parent



def _schema():
    sys.path.insert(0, str(ROOT))
    from flows import params

    return params


# env var -> flow parameter, nightly only (the site dataset)
DATASET = {"DOGFLOW_INPUT_PATH": "input_path", "DOGFLOW_OUTPUT_PATH": "output_path"}
SETTINGS = ("DOGFLOW_WORK_POOL", "DOGFLOW_TIMEZONE", "DOGFLOW_NIGHTLY_CRON")


class SiteError(ValueError):
    """A bad site value (one line)."""


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def site_parameters() -> dict[str, str]:
    """env var -> flow parameter, set on both deployments: every site parameter of flows.params, and the
    aliases (DOGFLOW_CHANNEL for DOGFLOW_CHANNELS)."""
    params = _schema()
    out = {params.site_var(p): p.name for p in params.PARAMS if p.site}
    out.update({p.alias.site: p.name for p in params.PARAMS if p.site and p.alias and p.alias.site})
    return out


def _site_values(given: Mapping[str, str]) -> dict[str, Any]:
    """The flow parameters of the site values given (each in the form the flow's type takes)."""
    params = _schema()
    values: dict[str, Any] = {}
    for var, name in site_parameters().items():
        if var not in given:
            continue
        p = params.BY_NAME[name]
        value = parse_value(given[var])
        if p.alias is not None and var == p.alias.site:
            if name in values:
                raise SiteError(f"give {params.site_var(p)} or {var}, not both")
            value = p.alias.convert(value)
        elif name in values:
            raise SiteError(f"give {params.site_var(p)} or {p.alias.site}, not both")
        if name == "cluster":
            for k, v in params.split_cluster(value).items():
                values[k] = v
            continue
        values[name] = params.as_text(value) if p.kind is params.Kind.TEXT else value
    return values


def apply_site(config: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``config`` (prefect.yaml, loaded) with the site values of ``env``; returns (config, what changed)."""
    given = {k: env[k].strip() for k in (*site_parameters(), *DATASET, *SETTINGS) if env.get(k, "").strip()}
    changes: list[str] = []
    try:
        params = _site_values(given)
    except ValueError as exc:
        raise SiteError(str(exc)) from None
    profile = params.get("cluster_file") or params.get("cluster")
    if profile:
        from flows.clusters import ProfileError, load_profile

        try:
            load_profile(str(profile))
        except ProfileError as exc:
            raise SiteError(f"DOGFLOW_CLUSTER: {exc}") from None
    dataset = {name: given[var] for var, name in DATASET.items() if var in given}
    if len(dataset) == 1:
        raise SiteError("give both DOGFLOW_INPUT_PATH and DOGFLOW_OUTPUT_PATH (the nightly dataset), or neither")
    _validate(params, dataset)

    for dep in config.get("deployments", []):
        nightly = dep.get("name") == "nightly"
        dep_params = dict(dep.get("parameters") or {})
        dep_params.update(params)
        if nightly:
            dep_params.update(dataset)
        dep["parameters"] = dep_params
        if "DOGFLOW_WORK_POOL" in given:
            dep["work_pool"] = {**(dep.get("work_pool") or {}), "name": given["DOGFLOW_WORK_POOL"]}
        if nightly:
            for sched in dep.get("schedules") or []:
                if "DOGFLOW_TIMEZONE" in given:
                    sched["timezone"] = given["DOGFLOW_TIMEZONE"]
                if "DOGFLOW_NIGHTLY_CRON" in given:
                    sched["cron"] = given["DOGFLOW_NIGHTLY_CRON"]
                if dataset:
                    sched["active"] = True
    changes += [f"{k}={v!r}" for k, v in {**params, **dataset}.items()]
    changes += [f"{k}={given[k]!r}" for k in SETTINGS if k in given]
    if dataset:
        changes.append("nightly schedule active")
    return config, changes


def _validate(params: dict[str, Any], dataset: dict[str, str]) -> None:
    """Types against the flow's signature (what the server would refuse with HTTP 422), and the time zone."""
    from prefect.exceptions import ParameterTypeError

    from flows.dog_filter import dog_filter

    probe = {"input_path": "x", "output_path": "y", **params, **dataset}
    flow_log = logging.getLogger("prefect.flows")
    level = flow_log.level
    flow_log.setLevel(logging.CRITICAL)  # validate_parameters logs the error too; it is reported below, once
    try:
        dog_filter.validate_parameters(probe)
    except ParameterTypeError as exc:
        raise SiteError("the flow's parameter types refuse a site value: " + " ".join(str(exc).split())) from None
    finally:
        flow_log.setLevel(level)
    # a string passes the type check of σ, channels and voxel size: parse them as the flow will
    from flows.request import ParameterError, parse_channels
    from tasks.units import UnitError, parse_lengths, parse_voxel_size

    checks: dict[str, Any] = {name: parse_lengths for name in ("sigma_small", "sigma_large") if params.get(name)}
    if params.get("voxel_size"):
        checks["voxel_size"] = parse_voxel_size
    if params.get("channels") and str(params["channels"]).lower() != "all":
        checks["channels"] = lambda v, name: parse_channels(v, 10**6)
    for name, parse in checks.items():
        try:
            parse(params[name], name)
        except (UnitError, ParameterError) as exc:
            raise SiteError(f"the flow refuses the site value of {name} ({params[name]!r}): {exc}") from None


def _check_timezone(env: Mapping[str, str]) -> None:
    tz = env.get("DOGFLOW_TIMEZONE", "").strip()
    if tz:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise SiteError(f"DOGFLOW_TIMEZONE: unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)") from None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deployments/site.py OUT.yaml", file=sys.stderr)
        return 2
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    try:
        _check_timezone(os.environ)
        config, changes = apply_site(config, os.environ)
    except SiteError as exc:
        print(f"deploy.sh: error: {exc}", file=sys.stderr)
        return 2
    Path(argv[0]).write_text("# prefect.yaml with this site's values (written by deployments/site.py)\n"
                             + yaml.safe_dump(config, sort_keys=False))
    print("deploy.sh: site values: " + (", ".join(changes) if changes else "none (prefect.yaml as it is)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
