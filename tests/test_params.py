"""The one parameter schema (flows/params.py) and what derives from it: flow signature, UI form schema, CLI
options of `run` and `plan`, site values, docs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import params
from flows.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _options(command: str) -> set[str]:
    """Every option flag `dogflow COMMAND --help` offers (typer's own help, parsed)."""
    import typer.main

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params if p.param_type_name == "option" for o in p.opts}


def test_engine_modes_are_the_schemas_choices():
    from tasks import defaults, dog

    assert defaults.MODES == dog.MODES  # tasks/defaults.py states them without importing the engine
    assert params.BY_NAME["mode"].choices() == dog.MODES


def test_run_takes_every_parameter_and_plan_every_one_that_changes_the_plan():
    run, plan = _options("run"), _options("plan")
    for p in params.PARAMS:
        flags = set(p.cli_flags) | (set(p.alias.flags) if p.alias else set())
        if not flags:
            continue  # the two paths are arguments; cluster_file is --cluster PATH
        assert flags <= run, (p.name, flags - run)
        assert (flags <= plan) == p.plan, (p.name, p.plan)
    assert {"--channels", "--sigma-small", "--sigma-large", "--voxel-size", "--fwhm-small", "--truncate", "--mode",
            "--output-dtype", "--cluster", "--positions"} <= plan
    assert "--allow-missing-chunks" in run


def test_the_ui_form_has_one_plain_field_per_parameter():
    """No "str | list | None" toggles: one JSON-schema type per property; choice lists for mode, dtype and the
    shipped profiles; no long float defaults (σ is text, empty = as the output was made)."""
    from flows.clusters import shipped_profiles
    from flows.dog_filter import dog_filter

    props = dog_filter.parameters.model_dump()["properties"]
    for name, prop in props.items():
        assert "anyOf" not in prop and "oneOf" not in prop, (name, prop)
        assert prop["type"] in ("string", "number", "integer", "boolean"), (name, prop)
    assert props["mode"]["enum"] == ["", "nearest", "reflect", "mirror", "constant", "wrap"]
    assert props["output_dtype"]["enum"] == ["", "float32", "float16", "uint16"]
    assert props["filter"]["enum"] == ["", "dog", "gaussian"] and props["sigma"]["type"] == "string"
    assert props["cluster"]["enum"] == shipped_profiles() and props["cluster"]["default"] == "local"
    assert props["cluster_file"]["type"] == "string"
    for name in ("sigma", "sigma_small", "sigma_large", "channels", "positions", "voxel_size"):
        assert props[name]["type"] == "string" and props[name]["default"] == "", name
        assert "e.g." in props[name]["description"], name
    assert "channel" not in props  # one channel parameter
    assert props["truncate"] == {**props["truncate"], "type": "number", "default": None}


def test_flow_parameters_accept_numbers_and_lists_as_text():
    """`--param sigma_small=2` (JSON number) and Python lists reach the flow as the text they stand for."""
    from flows.dog_filter import dog_filter

    got = dog_filter.validate_parameters({"input_path": "i", "output_path": "o", "sigma_small": 2,
                                          "sigma_large": [4, 8.5, 8.5], "channels": 1, "truncate": ""})
    assert (got["sigma_small"], got["sigma_large"], got["channels"], got["truncate"]) == ("2", "4,8.5,8.5", "1", None)


def test_prefect_yaml_lets_the_flow_check_its_parameters():
    import yaml

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert all(d.get("enforce_parameter_schema") is False for d in config["deployments"])


def test_site_values_are_the_schemas_site_parameters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_py", ROOT / "deployments" / "site.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)  # type: ignore[union-attr]
    names = site.site_parameters()
    assert {params.site_var(p) for p in params.PARAMS if p.site} <= set(names)
    assert names["DOGFLOW_CHANNEL"] == "channels"
    example = (ROOT / "deployments" / "sites" / "example.env").read_text()
    readme = (ROOT / "deployments" / "README.md").read_text()
    for var in names:
        assert var in example, var
        assert f"`{var}`" in readme, var
    values = site._site_values({"DOGFLOW_SIGMA_SMALL": "[8, 21.3, 21.3]", "DOGFLOW_CHANNEL": "1",
                                "DOGFLOW_CLUSTER": "/x/p.yaml", "DOGFLOW_TRUNCATE": "3"})
    assert values == {"sigma_small": "8,21.3,21.3", "channels": "1", "cluster_file": "/x/p.yaml", "truncate": 3}
    with pytest.raises(site.SiteError, match="not both"):
        site._site_values({"DOGFLOW_CHANNEL": "1", "DOGFLOW_CHANNELS": "0,1"})


def test_readme_parameter_table_is_the_schema():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- parameters: flows/params.py -->\n(.*?)\n<!-- end parameters -->", readme, re.S)
    assert m, "README.md lacks the parameter table"
    assert m.group(1).strip() == params.markdown_table().strip()


def test_request_fields_follow_the_schema_order():
    sig = params.signature()
    assert list(sig.parameters) == [p.name for p in params.PARAMS]
    assert all(sig.parameters[p.name].default is p.default for p in params.PARAMS if p.default is params.REQUIRED)
    assert inspect.signature(params.cli_signature).parameters  # importable without Prefect
