"""The console in a real browser (Debian's Chromium, driven by Playwright) against a real control plane.

The control plane is the end-to-end harness: gunicorn, a Celery worker and beat, and the `local`
provider starting real Ray nodes, so "watch it become RUNNING" is the real thing. The tests run in
file order and share one cluster: the first creates it from the form, the last terminates it.

Each main page is saved as a PNG into CUMULUS_SCREENSHOT_DIR (a temporary folder by default; the
README's pictures come from `CUMULUS_SCREENSHOT_DIR=docs/screenshots`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.harness import ControlPlaneHarness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "console-pass-1"
WS = "e2e"
CLUSTER = "demo"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
# The job of test_a_job_streams_its_log_into_the_job_page: lines a few seconds apart, markup to be shown as
# text, and one line wider than a phone.
JOB_MAIN = """\
import time

print("metrics: " + ", ".join(f"loss_{i}={1 / (i + 1):.4f}" for i in range(8)), flush=True)
for step in range(1, 6):
    print(f"step {step} of 5: <ok> & on", flush=True)
    time.sleep(1.5)
print("all done", flush=True)
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def plane(control_plane: ControlPlaneHarness) -> ControlPlaneHarness:
    """The control plane with a person of each role in workspace e2e, each with a password."""
    for role in ("owner", "member", "viewer"):
        control_plane.manage("create_user", f"{role}@example.com", "--workspace", WS, "--role", role,
                             "--password", PASSWORD)
    return control_plane


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("CUMULUS_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sign_in(browser: Browser, plane: ControlPlaneHarness, role: str, viewport: dict | None = None) -> Page:
    """A fresh browser session signed in as `role`, typed in with the keyboard as a person would."""
    context: BrowserContext = browser.new_context(viewport=viewport or DESKTOP, base_url=plane.plane.url)
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto("/console/")
    expect(page).to_have_url(re.compile(r"/console/login/\?next=/console/$"))
    expect(page.get_by_label("E-mail")).to_be_focused()
    page.keyboard.type(f"{role}@example.com")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"/console/w/{WS}/clusters/$"))
    return page


def forge_post(page: Page, path: str, data: dict | None = None) -> int:
    """POST from this browser session with its own valid CSRF token, as a hand-made request would."""
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(path, form={"csrfmiddlewaretoken": csrf, **(data or {})}, max_redirects=0)
    return response.status


def no_sideways_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def submit_job(plane: ControlPlaneHarness, script: str) -> str:
    """Submit `python main.py` with `script` as main.py over the REST API, as a client would: blob, snapshot, job."""
    api = plane.api()
    data = script.encode()
    digest = hashlib.sha256(data).hexdigest()
    blob = api.request("PUT", f"/workspaces/{WS}/blobs/{digest}", data=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert blob.status_code in (200, 201), blob.text
    snapshot = api.request("POST", f"/workspaces/{WS}/snapshots/", json={
        "files": [{"path": "main.py", "sha256": digest, "size": len(data), "mode": 0o644}]})
    assert snapshot.status_code == 201, snapshot.text
    job = api.request("POST", api.cluster_path(CLUSTER) + "jobs/",
                      json={"snapshot": snapshot.json()["id"], "entrypoint": "python main.py"})
    assert job.status_code == 201, job.text
    return job.json()["id"]


def test_sign_in_create_a_cluster_and_watch_it_become_running(browser: Browser, plane: ControlPlaneHarness,
                                                              shots: Path) -> None:
    page = sign_in(browser, plane, "member")
    expect(page.locator(".whoami")).to_contain_text("member@example.com")
    expect(page.locator(".whoami .role")).to_have_text("member")

    # given the create form, with its catalog of node types and prices
    page.get_by_role("link", name="New cluster").click()
    expect(page.get_by_role("heading", name=re.compile("New cluster"))).to_be_visible()
    expect(page.locator(".catalog")).to_contain_text("local.gpu")
    head = page.get_by_label("Head node type")
    expect(head.locator("option").first).to_have_text("local.small: 1 CPU, 2 GB, no GPU, $0.010/h (spot $0.004/h)")

    # when a worker group is added and removed again (htmx swaps the form; nothing typed is lost)
    page.get_by_label("Name", exact=True).fill(CLUSTER)
    page.get_by_role("button", name="Add worker group").click()
    expect(page.locator(".group")).to_have_count(2)
    expect(page.locator("#wg-1-name")).to_be_focused()
    page.get_by_role("button", name=re.compile(r"Remove worker group 2")).click()
    expect(page.locator(".group")).to_have_count(1)
    expect(page.get_by_label("Name", exact=True)).to_have_value(CLUSTER)

    # and one worker of local.small is asked for
    page.locator("#wg-0-instance_type").select_option("local.small")
    page.get_by_label("Min workers").fill("1")
    page.get_by_label("Max workers").fill("1")
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(shots / "create-cluster.png"), full_page=True)
    page.get_by_role("button", name="Create cluster").click()

    # then the detail page shows it, and its status becomes RUNNING without a reload
    expect(page).to_have_url(re.compile(rf"/console/w/{WS}/clusters/{CLUSTER}/$"))
    page.evaluate("window.sameDocument = true")
    status = page.locator("#cluster-status")
    expect(status).to_have_text(re.compile("RUNNING|FAILED"), timeout=240_000)
    assert status.inner_text() == "RUNNING", page.locator("#status-message").all_inner_texts()
    assert page.evaluate("window.sameDocument === true"), "the page reloaded"

    # and its nodes, events, chart and Ray dashboard link are there
    for node in ("head-1", "cpu-1"):
        expect(page.locator(f'tr[data-node="{node}"]')).to_contain_text("READY")
    expect(page.locator("#events")).to_contain_text(f"Cluster {CLUSTER} created")
    expect(page.locator("#events")).to_contain_text("RUNNING")
    expect(page.locator("figure.chart svg polygon")).to_have_count(2)
    expect(page.locator("#dashboard-link")).to_have_attribute("href", re.compile(r"^http://127\.0\.0\.1:\d+"))
    page.wait_for_timeout(2500)  # one more poll, so the chart has a little history to its right
    page.reload()  # (the "created" notice has had its say)
    page.screenshot(path=str(shots / "cluster-detail.png"), full_page=True)

    # and the list shows it with its nodes and cost
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Clusters").click()
    row = page.locator(f'tr[data-cluster="{CLUSTER}"]')
    expect(row).to_contain_text("RUNNING")
    expect(row).to_contain_text("2 ready")
    expect(row.locator("td.num")).to_have_text(re.compile(r"^\$\d"))
    page.screenshot(path=str(shots / "clusters.png"), full_page=True)


def test_a_job_streams_its_log_into_the_job_page(browser: Browser, plane: ControlPlaneHarness, shots: Path) -> None:
    # given the running cluster's page, and a job submitted over the API
    assert plane.api().cluster(CLUSTER)["status"] == "RUNNING"
    page = sign_in(browser, plane, "member")
    page.get_by_role("link", name=CLUSTER, exact=True).click()
    page.evaluate("window.sameDocument = true")
    job_id = submit_job(plane, JOB_MAIN)

    # when it shows up in the cluster's jobs table (without a reload) and its link is followed
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_contain_text("python main.py")
    assert page.evaluate("window.sameDocument === true"), "the cluster page reloaded"
    row.get_by_role("link", name=f"Job {job_id[:8]}").click()
    expect(page).to_have_url(re.compile(rf"/console/w/{WS}/jobs/{job_id}/$"))
    page.evaluate("window.sameDocument = true")

    # then its lines appear in the log view as the job prints them, not all at its end, markup as text
    log = page.get_by_role("log")
    expect(log).to_contain_text("step 1 of 5: <ok> & on", timeout=180_000)
    assert "all done" not in log.inner_text(), "the log arrived all at once"
    expect(page.locator("#job-status")).to_have_text("RUNNING")
    expect(page.get_by_role("link", name="Stop", exact=True)).to_be_visible()
    expect(log).to_contain_text("all done", timeout=60_000)

    # and the status chip becomes SUCCEEDED, the log stops following, all without a reload
    expect(page.locator("#job-status")).to_have_text("SUCCEEDED", timeout=60_000)
    expect(page.locator("#job-exit-code")).to_have_text("0")
    expect(page.locator("#job-log-poller")).to_have_text("End of the log.")
    expect(page.get_by_role("link", name="Stop", exact=True)).to_have_count(0)
    assert page.evaluate("window.sameDocument === true"), "the job page reloaded"
    lines = log.inner_text().splitlines()
    assert lines[0].startswith("metrics: loss_0=1.0000") and lines[-1] == "all done", lines
    assert [line for line in lines if line.startswith("step")] == [f"step {i} of 5: <ok> & on" for i in range(1, 6)]
    page.screenshot(path=str(shots / "job-log.png"), full_page=True)

    # and at phone width the wide line scrolls inside the log, not the page
    page.set_viewport_size(PHONE)
    assert no_sideways_scroll(page)
    assert page.evaluate("(e => e.scrollWidth > e.clientWidth)(document.getElementById('job-log'))")


def test_a_viewer_sees_no_controls_and_a_forged_post_is_refused(browser: Browser,
                                                                plane: ControlPlaneHarness) -> None:
    api = plane.api()
    assert api.cluster(CLUSTER)["status"] == "RUNNING"
    page = sign_in(browser, plane, "viewer")

    # the list has no create control; the detail has no stop or terminate
    expect(page.locator(f'tr[data-cluster="{CLUSTER}"]')).to_contain_text("RUNNING")
    expect(page.get_by_role("link", name="New cluster")).to_have_count(0)
    page.get_by_role("link", name=CLUSTER, exact=True).click()
    expect(page.locator("#cluster-status")).to_have_text("RUNNING")
    for verb in ("Start", "Stop", "Terminate"):
        expect(page.get_by_role("link", name=verb, exact=True)).to_have_count(0)

    # a hand-made POST with the viewer's own session and CSRF token is refused, and changes nothing
    assert forge_post(page, f"/console/w/{WS}/clusters/{CLUSTER}/terminate/") == 403
    assert forge_post(page, f"/console/w/{WS}/new-cluster/", {
        "name": "sneaky", "provider": "local", "head_instance_type": "local.small"}) == 403
    assert api.cluster(CLUSTER)["status"] == "RUNNING"
    assert [c["name"] for c in api.request("GET", api.cluster_path()).json()["results"]] == [CLUSTER]


def test_a_bad_form_shows_the_errors_beside_the_fields(browser: Browser, plane: ControlPlaneHarness) -> None:
    page = sign_in(browser, plane, "member")
    page.goto(f"/console/w/{WS}/new-cluster/")

    # when the form is sent with a bad name, min above max and a maximum that is not a number
    page.get_by_label("Name", exact=True).fill("Not A Name")
    page.get_by_label("Min workers").fill("3")
    page.get_by_label("Max workers").fill("lots")
    page.get_by_label("Idle timeout (minutes)").fill("-5")
    page.get_by_role("button", name="Create cluster").click()

    # then each message stands beside its field, the fields are marked invalid, and nothing was created
    expect(page.get_by_role("alert")).to_contain_text("The cluster was not created.")
    expect(page.locator("#name-errors")).to_have_text("Use 1-63 lowercase letters, digits or hyphens, "
                                                      "starting with a letter.")
    expect(page.locator("#wg-0-max_workers-errors")).to_have_text("A valid integer is required.")
    expect(page.locator("#idle_timeout_minutes-errors")).to_have_text(
        "Ensure this value is greater than or equal to 0.")
    expect(page.get_by_label("Name", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Name", exact=True)).to_have_value("Not A Name")

    # and the keyboard focus is visible where it lands
    page.get_by_label("Name", exact=True).focus()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
    names = [c["name"] for c in plane.api().request("GET", plane.api().cluster_path()).json()["results"]]
    assert "not-a-name" not in names and len(names) == 1


def test_the_tokens_page_shows_a_new_token_once_and_revokes_it(browser: Browser, plane: ControlPlaneHarness,
                                                               shots: Path) -> None:
    page = sign_in(browser, plane, "member")
    page.get_by_role("link", name="API tokens").click()

    # when a token is created
    page.get_by_label("Name", exact=True).fill("laptop")
    page.get_by_label("Expires in (days)").fill("30")
    page.get_by_role("button", name="Create token").click()

    # then it is shown once, and it works against the API
    raw = page.locator("#new-token").input_value()
    assert raw.startswith("cu_")
    page.screenshot(path=str(shots / "tokens.png"), full_page=True)
    me = plane.api()
    me.session.headers["Authorization"] = f"Bearer {raw}"
    assert me.request("GET", "/workspaces/").status_code == 200
    page.goto("/console/tokens/")  # the token is never stored: opening the page again cannot show it
    expect(page.locator("#new-token")).to_have_count(0)
    assert raw not in page.content()
    row = page.locator('tr[data-token="laptop"]')
    expect(row).to_contain_text(f"cu_…{raw[-4:]}")

    # when it is revoked (after a confirmation), then the API refuses it
    row.get_by_role("link", name=re.compile("Revoke")).click()
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator('tr[data-token="laptop"]')).to_contain_text("revoked")
    assert me.request("GET", "/workspaces/").status_code == 401


def test_members_and_the_audit_log(browser: Browser, plane: ControlPlaneHarness, shots: Path) -> None:
    page = sign_in(browser, plane, "owner")

    # an owner changes a member's role
    page.get_by_role("link", name="Members").click()
    expect(page.locator("#members tbody tr")).to_have_count(4)
    page.get_by_label("Role of viewer@example.com").select_option("member")
    page.locator('tr[data-member="viewer@example.com"]').get_by_role("button", name="Change").click()
    expect(page.locator(".flash")).to_contain_text("viewer@example.com is now member.")
    page.get_by_label("Role of viewer@example.com").select_option("viewer")
    page.locator('tr[data-member="viewer@example.com"]').get_by_role("button", name="Change").click()
    expect(page.locator(".flash")).to_contain_text("viewer@example.com is now viewer.")
    page.screenshot(path=str(shots / "members.png"), full_page=True)

    # and the audit log shows who did what, the cluster's creation among it
    page.get_by_role("link", name="Audit log").click()
    expect(page.locator("#audit")).to_contain_text("cluster.create")
    expect(page.locator("#audit")).to_contain_text("member.role")
    page.screenshot(path=str(shots / "audit.png"), full_page=True)


def test_the_console_is_readable_at_phone_width(browser: Browser, plane: ControlPlaneHarness, shots: Path) -> None:
    page = sign_in(browser, plane, "member", viewport=PHONE)
    expect(page.locator(f'tr[data-cluster="{CLUSTER}"]')).to_be_visible()
    assert no_sideways_scroll(page)
    page.screenshot(path=str(shots / "clusters-phone.png"), full_page=True)
    page.goto(f"/console/w/{WS}/clusters/{CLUSTER}/")
    expect(page.locator("figure.chart svg")).to_be_visible()
    assert no_sideways_scroll(page)
    page.goto(f"/console/w/{WS}/new-cluster/")
    assert no_sideways_scroll(page)
    page.screenshot(path=str(shots / "create-cluster-phone.png"), full_page=True)


def test_terminate_asks_first_and_the_cluster_goes(browser: Browser, plane: ControlPlaneHarness) -> None:
    page = sign_in(browser, plane, "member")
    page.get_by_role("link", name=CLUSTER, exact=True).click()

    # when Terminate is chosen, then the console asks first, with the focus on the confirming button
    page.get_by_role("link", name="Terminate", exact=True).click()
    expect(page.get_by_role("heading", name=f"Terminate {CLUSTER}")).to_be_visible()
    assert plane.api().cluster(CLUSTER)["status"] == "RUNNING"
    expect(page.get_by_role("button", name="Terminate")).to_be_focused()
    page.keyboard.press("Enter")

    # then the detail page follows the cluster down to TERMINATED without a reload, every node gone
    expect(page).to_have_url(re.compile(rf"/clusters/{CLUSTER}/$"))
    page.evaluate("window.sameDocument = true")
    expect(page.locator("#cluster-status")).to_have_text("TERMINATED", timeout=120_000)
    assert page.evaluate("window.sameDocument === true")
    expect(page.locator("#nodes")).to_contain_text("No live nodes.")
    assert plane.machines() == []
