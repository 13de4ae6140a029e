"""The manager's console in a real browser: headless Chromium driven by Selenium.

``syncd run`` serves the console against the sandbox, as in production; the
accounts are made with ``syncd user add``. Verdicts come from what the pages
show and from what the vendors (Mailchimp's emulator, the GA emulator's
deletion log, Phorest's records) and the ledger hold. One daemon world for the
module; one browser for reception and one for the manager, kept for every test.

Screenshots of the main pages go to ``$SYNCD_SCREENSHOTS`` if set (the README's
images: ``SYNCD_SCREENSHOTS=docs/screenshots``), else to a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from syncd import config
from syncd.ledger import Ledger
from tests.support import Running, started_daemon, syncd_cli

# Taken out of the environment at collection: syncd reads every SYNCD_* variable as a
# setting, and this one names no section of the configuration.
SCREENSHOTS = os.environ.pop("SYNCD_SCREENSHOTS", None)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("browser tests need the system packages chromium and chromium-driver",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

# About 20 s (up to 30: Forget is seen within two poll intervals) on two idle cores, for
# one daemon world and two browsers: under the `slow` mark's 30 s.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PAPER_FORMS = "paper_forms"
MANUAL_PROCESSORS = f"""
[[manual_processors]]
name = "{PAPER_FORMS}"
instructions = "Shred the client's paper consultation forms in the locked cabinet"
"""
MANAGER, RECEPTION, VICTIM = "ann", "desk", "temp"
PASSWORDS = {MANAGER: "manager-pass-1234", RECEPTION: "reception-pass-1234",
             VICTIM: "victim-pass-12345"}
ROLES = {MANAGER: "manager", RECEPTION: "reception", VICTIM: "reception"}
HANG_GUARD_SECONDS = 30  # the daemon verifies Forget every poll interval (5 s here)
WINDOW = (1200, 900)


@dataclass
class World:
    """The daemon, the sandbox, two logged-in browsers and where screenshots go."""

    run: Running
    shots: Path
    base: str
    fresh: dict[str, WebDriver] = field(default_factory=dict)
    browsers: dict[str, WebDriver] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    filed: dict[str, Any] = field(default_factory=dict)

    @property
    def ledger_path(self) -> Path:
        return Path(config.load(self.run.config_path).ledger.path)

    def browser(self, name: str) -> WebDriver:
        """The browser logged in as ``name`` (started and logged in on first use)."""
        if name not in self.browsers:
            driver = self.fresh.pop(name)
            log_in(driver, self.base, name, PASSWORDS[name])
            self.browsers[name] = driver
        return self.browsers[name]

    def shot(self, driver: WebDriver, name: str) -> None:
        """A PNG of the page as it is now, from its top."""
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(self.shots / f"{name}.png"))

    def person(self) -> dict[str, Any]:
        """An active, consenting, subscribed client alone at their address, not used yet."""
        sandbox = self.run.sandbox
        clients = sandbox.phorest.snapshot_clients()
        emails = Counter((c.get("email") or "").strip().lower() for c in clients)
        for c in clients:
            email = (c.get("email") or "").strip().lower()
            if (c["clientId"] not in self.taken and email and emails[email] == 1
                    and c.get("emailMarketingConsent")
                    and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))
                    and (sandbox.mailchimp.member(c["email"]) or {}).get("status")
                    == "subscribed"):
                self.taken.add(c["clientId"])
                return c
        raise AssertionError("the seeded world has too few such clients")

    def request(self, request_id: int) -> tuple[str, dict[str, str]]:
        """The request's state and each processor's step state, from the ledger."""
        with Ledger.open(self.ledger_path) as ledger:
            found = ledger.request(request_id)
            steps = ledger.steps(request_id)
        assert found is not None
        return found.state, {s.processor: s.state for s in steps}

    def audit(self, action: str) -> list[Any]:
        with Ledger.open(self.ledger_path) as ledger:
            return [e for e in ledger.find_audit(limit=1000, newest_first=True)
                    if e.action == action]


def new_browser() -> WebDriver:
    """Headless Chromium of the system, through its own driver (nothing downloaded)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     "--password-store=basic", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(HANG_GUARD_SECONDS)
    return driver


def log_in(driver: WebDriver, base: str, name: str, password: str) -> None:
    """Fill the login form and send it (whatever the outcome)."""
    driver.get(f"{base}/login")
    form = driver.find_element(By.ID, "login")
    form.find_element(By.NAME, "name").clear()
    form.find_element(By.NAME, "name").send_keys(name)
    form.find_element(By.NAME, "password").send_keys(password)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    left(driver, form)


def left(driver: WebDriver, element: WebElement) -> None:
    """Wait until the page that held ``element`` is replaced (a form was sent)."""
    # Mid-navigation, chromedriver may answer "node does not belong to the document"
    # instead of "stale": ask again.
    WebDriverWait(driver, HANG_GUARD_SECONDS, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(element))


def text(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


def step_states(driver: WebDriver) -> dict[str, str]:
    """processor -> state, as the request page's steps table shows them."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#steps tbody tr")
    return {row.get_attribute("id").removeprefix("step-"):
            row.find_elements(By.TAG_NAME, "td")[0].text.strip() for row in rows}


def reload_until(driver: WebDriver, done: Callable[[], bool], what: str) -> None:
    """Reload the page until ``done()`` (a hang guard, not a speed check)."""
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
        driver.refresh()


def unlabelled_inputs(driver: WebDriver) -> list[str]:
    """Every visible form control of the page that has no <label> (for=id, or around it)."""
    return driver.execute_script("""
        const missing = [];
        for (const el of document.querySelectorAll('input, select, textarea')) {
            if (el.type === 'hidden' || el.type === 'submit') continue;
            const labelled = (el.id && document.querySelector(`label[for="${el.id}"]`))
                || el.closest('label');
            if (!labelled) missing.push(el.name || el.id || el.outerHTML.slice(0, 60));
        }
        return missing;""")


def _ga_deletions(world: World, client_id: str) -> int:
    digest = hashlib.sha256(client_id.encode()).hexdigest()
    return sum(d["identifier_sha256"] == digest for d in world.run.sandbox.google.deletions())


def _mailchimp_status(world: World, email: str) -> int:
    """Mailchimp's answer to GET member, through its own API (404: erased)."""
    sandbox = world.run.sandbox
    c = sandbox.credentials
    member = hashlib.md5(email.strip().lower().encode()).hexdigest()
    return requests.get(f"{sandbox.base_url}/3.0/lists/{c.mailchimp_list_id}/members/{member}",
                        auth=("syncd", c.mailchimp_api_key), timeout=10).status_code


# -- the world ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """``syncd run`` with the sandbox, three accounts, and two browsers (closed at the end)."""
    tmp_path = tmp_path_factory.mktemp("console_browser")
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        # The browsers start while the daemon does its first resync.
        starting = {name: pool.submit(new_browser) for name in (RECEPTION, MANAGER)}
        try:
            with started_daemon(tmp_path, clients=60, seed=31, extra_toml=MANUAL_PROCESSORS,
                                until_healthy=False) as run:

                def add(name: str) -> subprocess.CompletedProcess[str]:
                    secret = tmp_path / f"{name}.password"
                    secret.write_text(PASSWORDS[name] + "\n")
                    secret.chmod(0o600)
                    return syncd_cli(run.config_path, "user", "add", name, "--role",
                                     ROLES[name], "--password-file", str(secret))

                for done in pool.map(add, PASSWORDS):
                    assert done.returncode == 0, done.stdout + done.stderr
                world = World(run, shots, f"http://127.0.0.1:{run.console_port}",
                              fresh={name: future.result() for name, future in starting.items()})
                yield world
        finally:
            for future in starting.values():
                if future.exception() is None:
                    future.result().quit()


# -- e. the keyboard and the labels ----------------------------------------------------------


def test_the_login_form_works_with_the_keyboard_alone_and_every_input_has_a_label(
    world: World,
) -> None:
    driver = world.fresh.pop(RECEPTION)  # logged in by keyboard below, reception's from then on
    world.browsers[RECEPTION] = driver
    driver.get(f"{world.base}/")
    assert driver.current_url.startswith(f"{world.base}/login")  # not logged in: sent here
    assert unlabelled_inputs(driver) == []
    # What the fields are for, for password managers and assistive tools (WCAG 1.3.5).
    assert [driver.find_element(By.NAME, name).get_attribute("autocomplete")
            for name in ("name", "password")] == ["username", "current-password"]
    world.shot(driver, "login")

    # From the top of the page: TAB to the name field, type, TAB, type, ENTER; keys only.
    def keys(*sent: str) -> None:
        ActionChains(driver).send_keys(*sent).perform()

    def focused() -> str | None:
        return driver.switch_to.active_element.get_attribute("name")

    for _ in range(5):  # the skip link comes first
        keys(Keys.TAB)
        if focused() == "name":
            break
    assert focused() == "name"
    keys(RECEPTION, Keys.TAB)
    assert focused() == "password"
    form = driver.find_element(By.ID, "login")
    keys(PASSWORDS[RECEPTION], Keys.ENTER)
    left(driver, form)

    assert driver.current_url == f"{world.base}/"
    assert text(driver, "#who") == f"{RECEPTION} (reception)"
    assert text(driver, "h1") == "Overview"

    # Every page either role can reach has a <label> for each input.
    manager = world.browser(MANAGER)
    for path in ("/", "/requests", "/requests/new", "/steps", "/retention", "/audit"):
        for who in (driver, manager):
            who.get(f"{world.base}{path}")
            assert unlabelled_inputs(who) == [], f"{path} as {who is manager and 'manager'}"
    manager.get(f"{world.base}/users")
    assert text(manager, "h1") == "Users"
    assert unlabelled_inputs(manager) == []
    # Nothing on any page was blocked by the console's Content-Security-Policy.
    logged = [entry["message"] for who in (driver, manager) for entry in who.get_log("browser")]
    assert not [m for m in logged if "Content Security Policy" in m], logged


# -- a. reception files an erasure at the desk ----------------------------------------------


def test_reception_files_an_erasure_by_email_and_sees_mailchimp_and_ga_done(
    world: World,
) -> None:
    driver = world.browser(RECEPTION)
    person = world.person()
    driver.get(f"{world.base}/")
    world.shot(driver, "overview")

    driver.get(f"{world.base}/requests/new")
    form = driver.find_element(By.ID, "file-request")
    form.find_element(By.CSS_SELECTOR, "input[name=kind][value=erase]").click()
    world.shot(driver, "file-a-request")  # before the address is typed: no email in the image
    form.find_element(By.NAME, "email").send_keys(person["email"].upper())
    form.find_element(By.NAME, "note").send_keys("asked at reception")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    left(driver, form)

    heading = text(driver, "h1")
    assert heading.endswith(f"erase client {person['clientId']}"), heading
    request_id = int(driver.current_url.rsplit("/", 1)[1])
    assert f"Request #{request_id} filed." in text(driver, ".flashes")
    world.filed.update(id=request_id, person=person)

    reload_until(driver, lambda: step_states(driver).get("mailchimp") == "done"
                 and step_states(driver).get("google_analytics") == "done",
                 "the Mailchimp and GA steps to show done")
    shown = step_states(driver)
    assert shown == {"mailchimp": "done", "google_analytics": "done", "phorest": "waiting",
                     PAPER_FORMS: "waiting"}
    assert text(driver, "#request-state") == "open"
    assert "Client actions › Forget" in text(driver, "#step-phorest")
    assert driver.find_elements(By.CSS_SELECTOR, "#steps button") == []  # reception: none
    world.shot(driver, "request-waiting")

    # What the page says is what the vendors and the ledger hold.
    assert _mailchimp_status(world, person["email"]) == 404
    assert _ga_deletions(world, person["clientId"]) == 1
    state, steps = world.request(request_id)
    assert state == "open" and steps == shown
    assert "filed by desk" in driver.page_source


# -- c. reception may not confirm, nor manage users ------------------------------------------


def test_reception_sees_no_confirm_button_gets_403_on_users_and_a_forged_confirm_is_refused(
    world: World,
) -> None:
    driver = world.browser(RECEPTION)
    person = world.person()
    filed = syncd_cli(world.run.config_path, "request", "erase", "--client-id",
                      person["clientId"], "--by", "Desk", "--json")
    assert filed.returncode == 0, filed.stdout + filed.stderr
    request_id = int(json.loads(filed.stdout)["id"])

    driver.get(f"{world.base}/requests/{request_id}")
    assert PAPER_FORMS in step_states(driver)
    assert driver.find_elements(By.CSS_SELECTOR, "#steps button, form[action$='/confirm']") == []
    driver.get(f"{world.base}/steps")
    assert f"#{request_id}" in text(driver, "#manual-steps")
    assert driver.find_elements(By.CSS_SELECTOR, "#manual-steps button") == []
    assert "Users" not in text(driver, "nav")
    driver.get(f"{world.base}/users")
    assert text(driver, "h1") == "Not allowed"
    assert "manager" in text(driver, "main")

    # The manager's page for the same request has the button reception lacks.
    manager = world.browser(MANAGER)
    manager.get(f"{world.base}/requests/{request_id}")
    assert manager.find_elements(By.CSS_SELECTOR, f"#step-{PAPER_FORMS} button")

    # A forged confirm from reception's own session, with a valid CSRF token from its page.
    driver.get(f"{world.base}/requests/new")
    token = driver.find_element(By.NAME, "csrf_token").get_attribute("value")
    with requests.Session() as http:
        for cookie in driver.get_cookies():
            http.cookies.set(cookie["name"], cookie["value"])
        answer = http.post(f"{world.base}/requests/{request_id}/confirm",
                           data={"csrf_token": token, "processor": PAPER_FORMS,
                                 "back": "request"}, allow_redirects=False, timeout=10)
        assert answer.status_code == 403, answer.text
        assert "manager" in answer.text
        # Without the token it is refused before anything else looks at it.
        tokenless = http.post(f"{world.base}/requests/{request_id}/confirm",
                              data={"processor": PAPER_FORMS}, allow_redirects=False,
                              timeout=10)
        assert tokenless.status_code == 400
    # The same forgery as a form injected into the page and submitted by the browser.
    driver.get(f"{world.base}/requests/{request_id}")
    page = driver.find_element(By.ID, "steps")
    driver.execute_script("""
        const form = document.createElement('form');
        form.method = 'post'; form.action = arguments[0]; form.id = 'forged';
        for (const [name, value] of Object.entries(arguments[1])) {
            const input = document.createElement('input');
            input.type = 'hidden'; input.name = name; input.value = value;
            form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();""", f"/requests/{request_id}/confirm",
        {"csrf_token": token, "processor": PAPER_FORMS, "back": "request"})
    left(driver, page)
    assert text(driver, "h1") == "Not allowed"

    # Nothing changed: the step still waits, no confirmation in the audit trail.
    state, steps = world.request(request_id)
    assert state == "open" and steps[PAPER_FORMS] == "waiting"
    with Ledger.open(world.ledger_path) as ledger:
        trail = ledger.find_audit(request_id=request_id)
    assert not [e for e in trail if e.actor == RECEPTION and e.processor == PAPER_FORMS]


# -- b. the manager follows the request to its end -------------------------------------------


def test_the_manager_confirms_the_paper_forms_and_the_request_completes_after_forget(
    world: World,
) -> None:
    if not world.filed:
        pytest.skip("needs the erasure reception filed (test a)")
    request_id, person = world.filed["id"], world.filed["person"]
    driver = world.browser(MANAGER)
    driver.get(f"{world.base}/requests/{request_id}")
    assert step_states(driver)["phorest"] == "waiting"
    world.run.sandbox.phorest.forget(person["clientId"])  # staff press Forget in Phorest

    driver.get(f"{world.base}/steps")
    assert f"#{request_id}" in text(driver, "#manual-steps")
    world.shot(driver, "manual-steps")

    driver.get(f"{world.base}/requests/{request_id}")
    button = driver.find_element(By.CSS_SELECTOR, f"#step-{PAPER_FORMS} button")
    button.click()
    left(driver, button)
    assert f"the {PAPER_FORMS} step is confirmed" in text(driver, ".flashes")
    assert step_states(driver)[PAPER_FORMS] == "done"
    # Not done while the daemon has not seen the client forgotten in Phorest yet (once it
    # has, the request completes within a moment: the page may catch it in between).
    if step_states(driver)["phorest"] == "waiting":
        assert text(driver, "#request-state") == "open"

    reload_until(driver, lambda: text(driver, "#request-state") == "done",
                 "the request page to show the request done")
    assert set(step_states(driver).values()) == {"done"}
    assert driver.find_elements(By.CSS_SELECTOR, "#steps button") == []
    world.shot(driver, "request-complete")

    state, steps = world.request(request_id)
    assert state == "done" and set(steps.values()) == {"done"}
    with Ledger.open(world.ledger_path) as ledger:
        trail = ledger.find_audit(request_id=request_id)
    assert [e for e in trail if e.processor == PAPER_FORMS and e.actor == MANAGER]

    driver.get(f"{world.base}/users")
    assert {row.get_attribute("id") for row in driver.find_elements(
        By.CSS_SELECTOR, "#users tbody tr")} >= {f"user-{n}" for n in PASSWORDS}
    world.shot(driver, "users")
    for page, shot in (("/retention", "retention"), ("/audit", "audit")):
        driver.get(f"{world.base}{page}")
        world.shot(driver, shot)


# -- d. five wrong passwords lock the account -----------------------------------------------


def test_five_wrong_passwords_lock_the_account_and_the_right_one_is_refused_then(
    world: World,
) -> None:
    driver = world.browser(RECEPTION)
    driver.delete_all_cookies()  # reception's browser, logged out
    for attempt in range(5):
        log_in(driver, world.base, VICTIM, f"wrong password {attempt}")
        # The same answer each time, lock or not: a guesser learns nothing.
        said = text(driver, "#form-problem")
        assert said.startswith("Wrong login name or password") and "locked for" in said
    world.shot(driver, "login-locked")
    log_in(driver, world.base, VICTIM, PASSWORDS[VICTIM])  # only the right password is told
    assert "This account is locked" in text(driver, "#form-problem")
    assert driver.find_elements(By.ID, "who") == []  # not logged in
    driver.get(f"{world.base}/")
    assert driver.current_url.startswith(f"{world.base}/login")

    locked = [e for e in world.audit("staff_locked") if f"account {VICTIM}" in (e.detail or "")]
    assert len(locked) == 1
    with Ledger.open(world.ledger_path) as ledger:
        member = ledger.staff_member(VICTIM)
    assert member is not None and member.locked_until is not None
