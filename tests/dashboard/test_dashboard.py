"""The web dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real
`kjob up`: log in through the printed URL, follow a run live, pause and resume, and the
security properties a user (or an attacker) can see from outside: roles, CSRF, tenancy,
escaping, headers. Screenshots of every page at 1280 and 390 px go to docs/dashboard/."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.support.up import Up

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"
WIDTHS = {"wide": (1280, 860), "narrow": (390, 844)}
# Deadlines, not sleeps: each expectation waits up to this long for its condition (a loaded
# CI machine runs the browser, kjob and PostgreSQL on two cores).
expect.set_options(timeout=15_000)

#: Any script that runs in the page would set this; escaping means none ever does.
XSS = "<script>window.kjobPwned = 1</script><img src=x onerror=\"window.kjobPwned = 2\">"


def job_body(gate: Path) -> dict:
    # The run waits for the test to open `gate`: the page must show its first line while it runs.
    prompt = (f"echo started\n# {XSS}\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
              "echo 'finished <b>not bold</b>'")
    return {"slug": "hello", "prompt": prompt, "agent": "shell", "schedule": "0 9 * * MON",
            "timezone": "Europe/Berlin", "description": f"says hello {XSS}", "labels": {"team": "ops"}}


def printed_dashboard_url(up: Up) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"dashboard (http://\S+/ui/\?token=\S+)", up.logs())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"kjob up printed no dashboard URL: {up.logs()}")


#: Problems a keyboard or screen-reader user would hit on the current page.
A11Y_PROBLEMS = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push("no lang");
  if (document.querySelectorAll("h1").length !== 1) problems.push("not one h1");
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
    if (!el.labels || el.labels.length === 0) problems.push(`unlabelled ${el.name}`);
  }
  for (const el of document.querySelectorAll("button, a[href]")) {
    if (!el.textContent.trim() && !el.getAttribute("aria-label")) problems.push(`nameless ${el.outerHTML}`);
  }
  for (const el of document.querySelectorAll("[tabindex]")) {
    if (Number(el.getAttribute("tabindex")) > 0) problems.push(`tabindex>0 ${el.id}`);
  }
  return problems;
}"""


async def shoot(page: Page, name: str) -> None:
    """The current page at both widths, full length, after checking it is accessible: every
    field labelled, every control named, one h1, and nothing wider than the narrow screen
    (wide tables scroll in their own region or become cards)."""
    assert await page.evaluate(A11Y_PROBLEMS) == [], name
    for width_name, (width, height) in WIDTHS.items():
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=str(SHOTS / f"{name}-{width_name}.png"), full_page=True)
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} is {overflow}px wider than {width}px"
    await page.set_viewport_size({"width": 1280, "height": 860})


async def new_context(browser: Browser, base: str) -> BrowserContext:
    return await browser.new_context(base_url=base, viewport={"width": 1280, "height": 860})


async def form_csrf(page: Page) -> str:
    return await page.locator("form[action='/ui/logout'] input[name=csrf]").input_value()


@pytest.fixture
def up(tmp_path):
    gate_dir = tmp_path / "gates"
    gate_dir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    up = Up(home, env={"KJOB_EXECUTOR__EXTRA_BINDS": json.dumps([str(gate_dir)])}).start()
    up.gates = gate_dir
    try:
        yield up
    finally:
        assert up.stop() == 0, up.logs()


async def test_dashboard_in_chromium(up) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = printed_dashboard_url(up)
    base = url.split("/ui/")[0]
    gate = up.gates / "go"
    created = up.client.post("/v1/jobs", json=job_body(gate))
    assert created.status_code == 201, created.text
    viewer = up.client.post("/v1/tokens", json={"role": "viewer", "name": "dashboard test"}).json()["secret"]
    other = up.client.post("/v1/tokens", json={"role": "admin", "tenant": "other"}).json()["secret"]

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            await _admin_flow(browser, base, url, up, gate)
            run_id = up.client.get("/v1/jobs/hello/runs").json()[0]["id"]
            await _viewer_and_csrf(browser, base, viewer, up)
            await _other_tenant(browser, base, other, run_id)
            await _login_page(browser, base, run_id, (up.home / "admin.token").read_text().strip())
        finally:
            await browser.close()


async def _admin_flow(browser: Browser, base: str, url: str, up: Up, gate: Path) -> None:
    context = await new_context(browser, base)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The refused edit answers 422 on purpose; any other console error (a CSP violation, a
    # missing asset, a script error) fails the test.
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 422" not in m.text else None)

    # The printed URL logs in once; the token is then in no URL and no script can read it.
    response = await page.goto(url)
    assert response is not None and response.ok
    assert urlparse(page.url).path == "/ui/" and "token" not in page.url
    (cookie,) = [c for c in await context.cookies() if c["name"] == "kjob_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/ui"
    assert await page.evaluate("document.cookie") == ""
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert "frame-ancestors 'self'" in headers["content-security-policy"]

    # The jobs list: the job made through the API, its schedule in words and in cron.
    row = page.locator("table.jobs tbody tr", has=page.get_by_role("link", name="hello", exact=True))
    await expect(row).to_contain_text("at 09:00 on Monday")
    await expect(row).to_contain_text("0 9 * * MON")
    await expect(row).to_contain_text("Europe/Berlin")
    await expect(row).to_contain_text("enabled")
    await expect(row).to_contain_text("no run yet")
    await page.get_by_label("Label").fill("team=nobody")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.get_by_text("0 of 1 jobs")).to_be_visible()
    await page.get_by_label("Label").fill("team=ops")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.get_by_text("1 of 1 jobs")).to_be_visible()
    await shoot(page, "jobs")

    # The job page: the prompt's markup is text, and nothing it holds ran.
    await page.get_by_role("link", name="hello", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("hello")
    await expect(page.locator("pre.prompt")).to_contain_text(XSS)
    await expect(page.locator(".desc")).to_have_text(f"says hello {XSS}")
    await expect(page.locator("ol.nexts li")).to_have_count(10)
    assert await page.evaluate("window.kjobPwned") is None

    # Run now: the run page follows the run live, then shows how it ended.
    await page.get_by_role("button", name="Run now").click()
    await expect(page).to_have_url(re.compile(r"/ui/runs/[0-9a-f-]+$"))
    status = page.locator("#run-status")
    log = page.locator("#log")
    await expect(log).to_contain_text("started", timeout=20_000)
    await expect(status).to_have_text("running")  # the first line showed while the run ran
    await shoot(page, "run-live")
    gate.touch()
    await expect(status).to_have_text("succeeded", timeout=20_000)
    await expect(log).to_contain_text("finished <b>not bold</b>")
    await expect(page.locator("#run")).to_have_attribute("data-final", "true")
    await shoot(page, "run")

    # Its log, opened from the job's run history.
    await page.get_by_role("link", name="hello").first.click()
    await page.locator("table.runs tbody th a").first.click()
    await expect(page.locator("#log")).to_contain_text("started\nfinished <b>not bold</b>")
    assert await page.locator("#log b").count() == 0
    await page.get_by_role("link", name="hello").first.click()

    # Pause with a note (it is asked for), then resume.
    await expect(page.locator("table.runs tbody tr")).to_have_count(1)
    await page.get_by_role("button", name="Pause").click()
    assert await page.locator("#pause-note:invalid").count() == 1  # an empty note is not sent
    await page.get_by_label("Why pause?").fill("migration <em>window</em>")
    await page.get_by_role("button", name="Pause").click()
    await expect(page.get_by_role("status")).to_contain_text("Paused.")
    await expect(page.locator(".note-box")).to_contain_text("migration <em>window</em>")
    job = up.client.get("/v1/jobs/hello").json()
    assert (job["enabled"], job["paused_note"]) == (False, "migration <em>window</em>")
    await expect(page.locator("ol.nexts li")).to_have_count(0)
    await shoot(page, "job-paused")
    await page.get_by_role("button", name="Resume").focus()
    await page.keyboard.press("Enter")  # every action works from the keyboard
    await expect(page.get_by_role("status")).to_contain_text("Resumed.")
    assert up.client.get("/v1/jobs/hello").json()["enabled"] is True
    await expect(page.locator("table").last).to_contain_text("job.disable")  # the audit trail
    await shoot(page, "job")

    # Edit as TOML: a bad field is named and nothing changes; a good edit is saved.
    await page.get_by_role("link", name="Edit as TOML").click()
    toml = page.get_by_label(re.compile("The job file"))
    original = await toml.input_value()
    await toml.fill(original.replace('"0 9 * * MON"', '"61 * * * *"'))
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("alert")).to_contain_text("job.schedule")
    await shoot(page, "edit")
    assert up.client.get("/v1/jobs/hello").json()["schedule"] == "0 9 * * MON"
    await toml.fill(original.replace('"0 9 * * MON"', '"30 8 * * MON,FRI"'))
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("status")).to_contain_text("Saved.")
    await expect(page.locator(".facts").nth(1)).to_contain_text("at 08:30 on Monday, Friday")

    # Backfill: the preview says what would run, then it runs.
    await page.get_by_role("link", name="Backfill…").click()
    await page.get_by_label("From (included)").fill("2026-11-02T00:00")
    await page.get_by_label("To (included)").fill("2026-11-10T00:00Z")
    await page.get_by_label("Overlap policy").select_option("allow")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.get_by_role("heading", level=2)).to_have_text("3 slots: 3 to run, 0 already in the ledger")
    await shoot(page, "backfill")
    await page.get_by_role("button", name="Run 3 slots").click()
    await expect(page.get_by_role("status")).to_contain_text("3 queued under overlap policy allow")

    await page.get_by_role("link", name="Cluster").click()
    await expect(page.locator("table").first).to_contain_text("executor")
    await shoot(page, "cluster")
    assert await page.evaluate("window.kjobPwned") is None
    assert errors == []  # no CSP violation, no script error
    await context.close()


async def _viewer_and_csrf(browser: Browser, base: str, viewer: str, up: Up) -> None:
    context = await new_context(browser, base)
    page = await context.new_page()
    await page.goto(f"/ui/jobs/hello?token={viewer}")
    assert urlparse(page.url).path == "/ui/jobs/hello" and "token" not in page.url
    await expect(page.get_by_role("heading", level=1)).to_contain_text("hello")
    assert await page.locator("section.actions").count() == 0
    assert await page.locator("form[method=post]:not([action='/ui/logout'])").count() == 0
    for action in ("Run now", "Pause", "Resume", "Delete", "Edit as TOML", "Backfill…"):
        assert await page.get_by_text(action, exact=True).count() == 0, action
    await expect(page.locator("table.runs")).to_be_visible()
    await shoot(page, "job-viewer")
    # The viewer's own valid CSRF token does not lift its role: /v1's check answers.
    refused = await context.request.post("/ui/jobs/hello/run", form={"csrf": await form_csrf(page)})
    assert refused.status == 403 and "it needs" in await refused.text() and "operator" in await refused.text()
    await context.close()

    # An admin's session: a POST without the CSRF token, or with another session's, is refused
    # and changes nothing.
    admin_token = (up.home / "admin.token").read_text().strip()
    context = await new_context(browser, base)
    page = await context.new_page()
    await page.goto(f"/ui/?token={admin_token}")
    runs_before = len(up.client.get("/v1/jobs/hello/runs").json())
    for form in ({"note": "csrf"}, {"note": "csrf", "csrf": "forged"}):
        refused = await context.request.post("/ui/jobs/hello/pause", form=form)
        assert refused.status == 403 and "CSRF" in await refused.text()
    refused = await context.request.post("/ui/jobs/hello/run", form={})
    assert refused.status == 403
    assert up.client.get("/v1/jobs/hello").json()["enabled"] is True
    assert len(up.client.get("/v1/jobs/hello/runs").json()) == runs_before
    # Without the cookie (another site's form, SameSite aside): no session, nothing done.
    async with httpx.AsyncClient(base_url=base) as anonymous:
        answer = await anonymous.post("/ui/jobs/hello/pause", data={"note": "x", "csrf": await form_csrf(page)})
        assert answer.status_code == 401
    assert up.client.get("/v1/jobs/hello").json()["enabled"] is True
    await context.close()


async def _other_tenant(browser: Browser, base: str, other: str, run_id: str) -> None:
    context = await new_context(browser, base)
    page = await context.new_page()
    await page.goto(f"/ui/?token={other}")
    await expect(page.get_by_text("No jobs yet")).to_be_visible()
    for path in ("/ui/jobs/hello", f"/ui/runs/{run_id}", "/ui/jobs/hello/edit", "/ui/jobs/hello/backfill"):
        response = await page.goto(path)
        assert response is not None and response.status == 404, path
        await expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
        await expect(page.get_by_role("button", name="Log out")).to_be_visible()  # still logged in
    log = await context.request.get(f"/ui/runs/{run_id}/log")
    assert log.status == 404 and "started" not in await log.text()
    refused = await context.request.post("/ui/jobs/hello/pause", form={"note": "x", "csrf": await form_csrf(page)})
    assert refused.status == 404
    await context.close()


async def _login_page(browser: Browser, base: str, run_id: str, token: str) -> None:
    context = await new_context(browser, base)
    page = await context.new_page()
    # The Relay message's "Full log" link, opened without a session: login first, then the run.
    await page.goto(f"/ui/runs/{run_id}")
    await expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fruns%2F"))
    await page.get_by_label("API token").fill("kjob_nope_nope")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not valid")
    await shoot(page, "login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(re.compile(f"/ui/runs/{run_id}$"))
    await expect(page.locator("#run-status")).to_have_text("succeeded")
    await context.close()
