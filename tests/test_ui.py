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
from flows.sample import make_sample
from tasks import store
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
        _prop(page, "input_path").locator("textarea").fill(str(inp))
        _prop(page, "output_path").locator("textarea").fill(str(out))
        _prop(page, "channel").locator("input").fill("1")
        _prop(page, "sigma_small").locator("input[type=number]").fill("1.2")
        _prop(page, "sigma_large").locator("input[type=number]").fill("2.75")
        positions = _prop(page, "positions")
        positions.get_by_role("button", name="str", exact=True).click()
        positions.locator("textarea, input[type=text]").first.fill("0-1")
        # `cluster` offers the shipped profile names (and, on its second tab, any text: a YAML path)
        cluster = _prop(page, "cluster").locator(".p-select-button__control")
        cluster.focus()
        page.keyboard.press("ArrowDown")  # opens the list (a plain click does not, in this headless Chromium)
        page.locator(".p-select-option__text").first.wait_for()
        offered = [t.strip() for t in page.locator(".p-select-option__text").all_inner_texts()]
        assert set(shipped_profiles()) <= set(offered), offered
        page.locator(".p-select-option__text", has_text=re.compile(r"^\s*local\s*$")).click()
        assert cluster.inner_text().strip() == "local"
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
    assert fr.parameters["channel"] == 1 and fr.parameters["positions"] == "0-1"
    assert fr.parameters["sigma_small"] == 1.2 and fr.parameters["sigma_large"] == 2.75
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

    assert store.read_provenance(out)["shape"] == [2, 2, 8, 32, 32]
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
