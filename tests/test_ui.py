"""The Prefect UI drives a real run: headless Chromium (Playwright) opens the
dog-filter/on-demand deployment on a real server, Run -> Custom run, fills the
parameter form and submits; a real process worker runs it and the output is exact.

A screenshot and the page HTML are saved under test-artifacts/ on failure.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import assert_output_exact
from flows.clusters import shipped_profiles
from tasks.defaults import MODES, OUTPUT_DTYPES
from flows.sample import make_sample
from tasks.output import Output
from prefect_services import ROOT, PrefectServer, Worker, deploy, flow_run_logs, require, wait_flow_run

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - playwright is in requirements.lock
        require(False, f"playwright not importable: {exc}")
    require(shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), f"{CHROMIUM} not installed (apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:
            require(False, f"chromium does not start: {str(exc).splitlines()[0]}")
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def ui_site(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ui")
    # No scheduler service here: the nightly deployment's scheduled runs are tested in test_deployments,
    # and its bulk inserts would compete with the form's request on this small machine.
    server = PrefectServer(workdir, ui=True, extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
                           database="postgres").start()
    worker = None
    try:
        # the nightly deployment needs site paths; the UI test runs on-demand only
        deploy(server, {"DOGFLOW_INPUT_PATH": str(workdir / "unused-in.zarr"),
                        "DOGFLOW_OUTPUT_PATH": str(workdir / "unused-out.zarr")}, log=workdir / "deploy.log")
        worker = Worker(server).start()
        yield server
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def _prop(page, name: str):
    """The innermost schema-form property whose label is `name` (or `name (Optional)`)."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(name)}( \(Optional\))?$"))
    return page.locator(".schema-form-property").filter(has=label).last


def _choices(page, name: str, expect: str) -> list[str]:
    """The options a choice property's list offers, once ``expect`` shows (the list is left open). The empty
    choice ("as the output was made") has no visible text."""
    control = _prop(page, name).locator(".p-select-button__control")
    control.focus()
    page.keyboard.press("ArrowDown")  # opens the list (a plain click does not, in this headless Chromium)
    page.locator(".p-select-option__text:visible", has_text=re.compile(rf"^\s*{re.escape(expect)}\s*$")).wait_for()
    return [t.strip() for t in page.locator(".p-select-option__text:visible").all_inner_texts()]


def test_custom_run_from_the_ui(ui_site, browser, tmp_path, request):
    server = ui_site
    inp = tmp_path / "ui-in.zarr"
    out = tmp_path / "ui-out.ome.zarr"
    make_sample(inp, positions=2, channels=2, shape=(8, 32, 32), chunks=(4, 16, 16), blobs=6, seed=21)
    with server.client() as c:
        dep = c.read_deployment_by_name("dog-filter/on-demand")

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    problems: list[str] = []  # failed API calls and console errors, reported if the test fails
    page.on("response", lambda r: problems.append(f"{r.status} {r.request.method} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    try:
        page.goto(f"{server.url}/deployments/deployment/{dep.id}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url(re.compile(r"/run(\?|$)"))
        # one plain field per parameter, as a new user sees the form: no type toggles ("float | list | str"),
        # no "Property is type" notes, no long float defaults, one channel parameter
        form = page.locator(".schema-form-property").first
        form.wait_for()
        text = "\n".join(page.locator(".schema-form-property").all_inner_texts())
        assert "Property is type" not in text and " | " not in text, text[:3000]
        assert "21.27659574468085" not in text and "85.1063829787234" not in text
        assert _prop(page, "channel").count() == 0 and _prop(page, "channels").count() == 1
        for name in ("sigma_small", "sigma_large", "channels", "positions", "voxel_size", "cluster_file"):
            prop = _prop(page, name)
            assert prop.locator(".schema-form-property__fields button").count() == 0, f"{name} has a type toggle"
            assert prop.locator("textarea, input[type=text]").count() == 1, name
            assert name == "cluster_file" or "e.g." in prop.inner_text(), name  # the description's example
        _prop(page, "input_path").locator("textarea").fill(str(inp))
        _prop(page, "output_path").locator("textarea").fill(str(out))
        _prop(page, "channels").locator("textarea, input[type=text]").fill("1")
        _prop(page, "sigma_small").locator("textarea, input[type=text]").fill("1.2")
        _prop(page, "sigma_large").locator("textarea, input[type=text]").fill("2.75")
        _prop(page, "positions").locator("textarea, input[type=text]").fill("0-1")
        # choice lists: mode and output dtype (with the empty "as the output was made" choice), shipped profiles
        assert [c for c in _choices(page, "mode", "nearest") if c] == list(MODES)
        page.keyboard.press("Escape")
        assert [c for c in _choices(page, "output_dtype", "float32") if c] == list(OUTPUT_DTYPES)
        page.keyboard.press("Escape")
        offered = _choices(page, "cluster", "local")
        assert set(shipped_profiles()) <= set(offered), offered
        page.locator(".p-select-option__text:visible", has_text=re.compile(r"^\s*local\s*$")).click()
        assert _prop(page, "cluster").locator(".p-select-button__control").inner_text().strip() == "local"
        for _ in range(3):  # a 503 is this small server's busy database; the form stays and is sent again
            with page.expect_response(lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST") as created:
                page.get_by_role("button", name="Submit", exact=True).click()
            if created.value.status != 503:
                break
            page.wait_for_timeout(2000)
        assert created.value.status == 201, (created.value.status, created.value.text(), problems)
        # the UI goes back to the deployment page once the run is created
        page.wait_for_url(re.compile(rf"/deployments/deployment/{dep.id}(\?|$)"))
    except Exception as exc:
        _save(page, request.node.name, problems)
        raise AssertionError(f"UI run creation failed: {exc}; failed requests/console errors: {problems}") from exc

    # the run the form created, via the API
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = []
    deadline = time.monotonic() + 30
    while not runs and time.monotonic() < deadline:
        with server.client() as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        time.sleep(0.5)
    assert len(runs) == 1, runs
    fr = runs[0]
    assert fr.parameters["input_path"] == str(inp) and fr.parameters["output_path"] == str(out)
    assert fr.parameters["channels"] == "1" and fr.parameters["positions"] == "0-1"
    assert fr.parameters["sigma_small"] == "1.2" and fr.parameters["sigma_large"] == "2.75"
    assert fr.parameters.get("cluster", "local") == "local"

    final = wait_flow_run(server, str(fr.id), timeout=300)
    try:
        assert final.state.is_completed(), (final.state, flow_run_logs(server, str(fr.id)),
                                            f"service logs under {server.workdir}")
        # the run is shown as Completed in the UI too
        page.goto(f"{server.url}/runs/flow-run/{fr.id}")
        page.get_by_text("Completed").first.wait_for()
    except Exception:
        _save(page, request.node.name, problems)
        raise
    finally:
        page.close()

    assert Output(out).provenance()["shape"] == [2, 2, 8, 32, 32]
    assert_output_exact(out, inp, 1.2, 2.75, channel=1)


def _save(page, name: str, problems: list[str]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    stem = ARTIFACTS / re.sub(r"[^\w.-]+", "_", name)
    try:
        Path(f"{stem}.requests.txt").write_text("\n".join(problems) + "\n")
        page.screenshot(path=f"{stem}.png", full_page=True)
        Path(f"{stem}.html").write_text(page.content())
        print(f"UI failure artifacts: {stem}.png, {stem}.html")
    except Exception as exc:  # the original failure matters more
        print(f"could not save UI artifacts: {exc}")
