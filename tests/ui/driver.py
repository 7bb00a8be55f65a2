"""Drives the Scabbard web dashboard in ONE headless Chromium (Playwright for Python, the
system `chromium`) against a real controller and workers, and reports one JSON line per
flow: {"flow": name, "ok": bool, "detail": text}. tests/tests/ui.rs starts the cluster,
runs this and asserts every flow.

Environment: SCABBARD_URL (the controller's HTTP base URL), SCABBARD_TOKEN (admin),
SCABBARD_READ_TOKEN (read scope), SCABBARD_SCREENSHOTS_DIR (PNG output), CHROMIUM
(default /usr/bin/chromium).
"""

import json
import os
import sys
import time
import traceback
from urllib.parse import urlparse

from playwright.sync_api import sync_playwright

URL = os.environ["SCABBARD_URL"].rstrip("/")
ADMIN = os.environ["SCABBARD_TOKEN"]
READ = os.environ["SCABBARD_READ_TOKEN"]
SLOTS = int(os.environ.get("SCABBARD_WORKER_SLOTS", "4"))
SHOTS = os.environ.get("SCABBARD_SCREENSHOTS_DIR") or "/tmp/scabbard-ui-shots"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
results = []
CURRENT = {}


def report(flow, ok, detail=""):
    results.append(flow)
    print(json.dumps({"flow": flow, "ok": bool(ok), "detail": str(detail)[:2000]}), flush=True)


def flow(fn):
    """Runs one flow; an exception is that flow's failure, and the next ones still run."""
    try:
        detail = fn()
        report(fn.__name__, True, detail or "")
    except Exception as e:  # noqa: BLE001
        seen = ""
        pg = CURRENT.get("page")
        if pg is not None:
            try:
                seen = f"\nat {pg.url}:\n" + pg.inner_text("main")[:1500]
            except Exception:  # noqa: BLE001
                pass
        report(fn.__name__, False, f"{e}{seen}\n{traceback.format_exc()}")


def wait_for(what, cond, timeout=60.0, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def shot(page, name):
    os.makedirs(SHOTS, exist_ok=True)
    page.wait_for_timeout(300)
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def api(page, method, path, body=None, token=None):
    """A fetch from the page (same origin, bearer token): {status, body}."""
    return page.evaluate(
        """async ([method, path, body, token]) => {
            const init = {method, headers: {Authorization: `Bearer ${token}`}};
            if (body !== null) { init.body = JSON.stringify(body); init.headers['Content-Type'] = 'application/json'; }
            const r = await fetch(path, init);
            let b = null; try { b = await r.json(); } catch (_) {}
            return {status: r.status, body: b};
        }""",
        [method, path, body, token or ADMIN],
    )


def login(page, token):
    page.goto(f"{URL}/#/login")
    page.fill("#token-input", token)
    page.click("#login-btn")
    page.wait_for_selector("#who-scope")


def go(page, hash_path):
    page.evaluate("(h) => { location.hash = h; }", hash_path)


def state_of(page, sel):
    return page.eval_on_selector(sel, "e => e.dataset.state") if page.query_selector(sel) else None


def main():
    host = urlparse(URL).netloc
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox"],
        )
        ctx = browser.new_context(viewport={"width": 1360, "height": 900})
        page = ctx.new_page()
        requests, errors, violations = [], [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        ctx.add_init_script("document.addEventListener('securitypolicyviolation', e => { (window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI); });")
        state = {}
        CURRENT["page"] = page

        def csp_and_login():
            resp = page.goto(f"{URL}/")
            hd = resp.headers
            csp = hd.get("content-security-policy", "")
            for need in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"]:
                assert need in csp, f"CSP {csp!r} lacks {need}"
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
            assert hd.get("x-content-type-options") == "nosniff", hd
            assert hd.get("referrer-policy") == "no-referrer", hd
            page.wait_for_selector("#token-input")
            shot(page, "login")
            page.fill("#token-input", "scbd_api_wrong")
            page.click("#login-btn")
            page.wait_for_selector("#login-error .error")
            bad = page.inner_text("#login-error")
            page.fill("#token-input", ADMIN)
            page.click("#login-btn")
            page.wait_for_selector("#who-scope")
            assert page.inner_text("#who-scope") == "admin"
            assert page.evaluate("sessionStorage.getItem('scabbard.token')") == ADMIN
            assert page.context.cookies() == [], "the UI must not set cookies"
            return f"CSP: {csp}; wrong token: {bad.strip()}"
        flow(csp_and_login)

        def template_form_task_live():
            page.evaluate("window.__noReload = 1")
            go(page, "/templates/shell-task")
            page.wait_for_selector("#template-form")
            wait_for("a rendered preview", lambda: "command" in page.inner_text("#render-preview"))
            assert page.eval_on_selector("#param-colour", "e => e.tagName") == "SELECT"
            assert page.eval_on_selector("#param-lines", "e => e.type + ':' + e.min + '-' + e.max") == "number:1-50"
            page.fill("#param-lines", "500")
            msg = wait_for("the server's validation message", lambda: page.query_selector("#form-error .error") and page.inner_text("#form-error"))
            assert "lines" in msg, msg
            server = api(page, "POST", "/api/v1/templates/shell-task/render", {"params": {"lines": "500", "message": "hello", "colour": "green"}})
            assert server["body"]["message"] in msg, (server, msg)
            page.fill("#param-lines", "12")
            wait_for("the error to clear", lambda: not page.query_selector("#form-error .error"))
            shot(page, "template-form")
            # Every slot of the worker busy for a few seconds: the template's task is seen
            # QUEUED first, then RUNNING and SUCCEEDED, on the same page.
            for i in range(SLOTS):
                r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": f"ui-blocker-{i}", "shell": {"command": ["sh", "-c", "sleep 6"]}}})
                assert r["status"] == 200, r
            wait_for("the blockers to run", lambda: len(api(page, "GET", "/api/v1/tasks?states=TASK_STATE_RUNNING")["body"].get("tasks", [])) >= SLOTS, timeout=30)
            page.click("#run-btn")
            wait_for("the workflow page", lambda: page.evaluate("location.hash").startswith("#/workflows/"))
            link = page.wait_for_selector("svg.dag a.node-link[href]", timeout=30000)
            link.click()
            page.wait_for_selector("#task-state")
            seen = []
            lines_while_running = wait_for("log lines while RUNNING", lambda: (
                seen.append(state_of(page, "#task-state")) or
                (state_of(page, "#task-state") == "RUNNING" and page.eval_on_selector_all("#log .line", "ls => ls.length") >= 2 and page.eval_on_selector_all("#log .line", "ls => ls.length"))), timeout=60)
            count = lambda: page.eval_on_selector_all("#log .line", "ls => ls.length")
            more = wait_for("more log lines while still RUNNING", lambda: (
                seen.append(state_of(page, "#task-state")) or
                (state_of(page, "#task-state") == "RUNNING" and count() > lines_while_running and count())), timeout=30)
            lines_while_running = f"{lines_while_running} then {more}"
            shot(page, "task-running")
            wait_for("SUCCEEDED", lambda: state_of(page, "#task-state") == "SUCCEEDED", timeout=60)
            n = page.eval_on_selector_all("#log .line", "ls => ls.length")
            assert n >= 12, f"{n} log lines"
            green = page.eval_on_selector_all("#log .line .ansi-fg-2", "ls => ls.length")
            assert green >= 1, "ANSI green became no span"
            assert page.evaluate("window.__noReload") == 1, "the page reloaded"
            page.fill("#log-search", "line 3")
            hits = page.inner_text("#log-hits")
            assert hits.startswith("1 "), hits
            page.fill("#log-search", "")
            shot(page, "task")
            seen.append(state_of(page, "#task-state"))
            states = [s for i, s in enumerate(seen) if s and (i == 0 or seen[i - 1] != s)]
            assert states[0] in ("QUEUED", "ASSIGNED") and "RUNNING" in states and states[-1] == "SUCCEEDED", states
            return f"states seen {states}; {lines_while_running} lines while RUNNING, {n} at the end; search: {hits}"
        flow(template_form_task_live)

        def workflow_graph_live():
            wf = {"spec": {"name": "ui-three", "tasks": [
                {"name": "build", "spec": {"name": "build", "shell": {"command": ["sh", "-c", "echo building; sleep 2"]}}},
                {"name": "test", "dependsOn": ["build"], "spec": {"name": "test", "shell": {"command": ["sh", "-c", "echo testing; sleep 2; exit 3"]}}},
                {"name": "lint", "dependsOn": ["build"], "spec": {"name": "lint", "shell": {"command": ["sh", "-c", "echo lint ok; sleep 1"]}}},
            ], "failurePolicy": "FAILURE_POLICY_CONTINUE"}}
            r = api(page, "POST", "/api/v1/workflows", wf)
            assert r["status"] == 200, r
            wid = r["body"]["workflow"]["id"]
            state["workflow_id"] = wid
            go(page, f"/workflows/{wid}")
            page.wait_for_selector("svg.dag g.node[data-node=test]")
            history = {"build": [], "test": [], "lint": []}

            def sample():
                for n in history:
                    s = page.eval_on_selector(f"svg.dag g.node[data-node={n}]", "e => e.dataset.state")
                    if not history[n] or history[n][-1] != s:
                        history[n].append(s)
                return history["test"][-1] == "FAILED" and history["lint"][-1] == "SUCCEEDED"
            wait_for("test FAILED and lint SUCCEEDED", sample, timeout=90, every=0.05)
            sub = page.text_content("svg.dag g.node[data-node=test] .node-state")
            assert "exit 3" in sub, sub
            fill = page.eval_on_selector("svg.dag g.node[data-node=test] rect", "e => getComputedStyle(e).stroke")
            assert fill == "rgb(207, 34, 46)", f"failed node stroke {fill}"
            assert "RUNNING" in history["build"] or "RUNNING" in history["test"], history
            assert history["test"][-2:] == ["RUNNING", "FAILED"] or "RUNNING" in history["test"], history
            wait_for("the final state", lambda: page.query_selector("#wf-state") and state_of(page, "#wf-state") == "FAILED", timeout=30)
            progress = page.inner_text("#wf-progress")
            shot(page, "workflow")
            return f"node states seen live: {history}; test: {sub}; {progress}"
        flow(workflow_graph_live)

        def cancel_from_task_page():
            r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": "ui-long", "shell": {"command": ["sh", "-c", "echo started; sleep 120"]}}})
            assert r["status"] == 200, r
            tid = r["body"]["task"]["id"]
            state["long_task"] = tid
            go(page, f"/tasks/{tid}")
            # Cancel the moment the page shows RUNNING (the process may not have started):
            # an accepted cancel ends the attempt whatever the timing.
            wait_for("RUNNING", lambda: state_of(page, "#task-state") == "RUNNING", timeout=60)
            page.click("#cancel-btn")
            wait_for("CANCELLED", lambda: state_of(page, "#task-state") == "CANCELLED", timeout=60)
            assert not page.query_selector("#cancel-btn")
            return f"task {tid} cancelled from its page"
        flow(cancel_from_task_page)

        def cancel_answer_after_the_task_ended():
            # The answer to Cancel reaches the page only after the task's CANCELLED event
            # (as under load, when the attempt ends faster than the browser reads the POST's
            # reply): the page must keep showing CANCELLED, not the answer's older RUNNING
            # with "Cancel requested…" (no event follows a final state to repair it).
            r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": "ui-late-answer", "shell": {"command": ["sh", "-c", "echo started; sleep 120"]}}})
            assert r["status"] == 200, r
            tid = r["body"]["task"]["id"]
            go(page, f"/tasks/{tid}")
            wait_for("RUNNING", lambda: state_of(page, "#task-state") == "RUNNING", timeout=60)
            held = []
            pattern = f"**/api/v1/tasks/{tid}/cancel"
            page.route(pattern, lambda route: held.append(route))
            try:
                page.click("#cancel-btn")
                wait_for("the page's cancel request", lambda: page.query_selector("body") and held, timeout=30)
                answer = held[0].fetch()  # the controller accepts the cancel now
                assert answer.status == 200, answer.status
                wait_for("CANCELLED from the live events", lambda: state_of(page, "#task-state") == "CANCELLED", timeout=60)
                held[0].fulfill(response=answer)
                # The page reads the answer (a fetch from the page after it is served).
                api(page, "GET", f"/api/v1/tasks/{tid}")
                page.wait_for_timeout(500)
                shown = state_of(page, "#task-state")
                button = page.query_selector("#cancel-btn")
                assert shown == "CANCELLED" and not button, f"after the late answer the page shows {shown}, cancel button: {button and button.inner_text()}"
            finally:
                page.unroute(pattern)
            return f"task {tid}: CANCELLED kept after the late answer to Cancel"
        flow(cancel_answer_after_the_task_ended)

        def script_payloads_are_text():
            cmd = f"printf '%s\\n' '{XSS}'; echo '<b>bold?</b>'"
            r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": XSS, "labels": {"x": "<svg onload=alert(1)>"}, "shell": {"command": ["sh", "-c", cmd]}}})
            assert r["status"] == 200, r
            tid = r["body"]["task"]["id"]
            state["xss_task"] = tid
            go(page, f"/tasks/{tid}")
            wait_for("SUCCEEDED", lambda: state_of(page, "#task-state") == "SUCCEEDED", timeout=60)
            page.wait_for_selector("#log-status:has-text('complete')")
            assert page.inner_text("#task-name") == XSS
            log = page.inner_text("#log")
            assert XSS in log, log
            go(page, "/tasks")
            page.wait_for_selector(f"tr[data-task-id='{tid}']")
            assert page.inner_text(f"tr[data-task-id='{tid}'] .task-name") == XSS
            imgs = page.evaluate("document.querySelectorAll('main img, main script, main svg[onload]').length")
            assert imgs == 0, f"{imgs} injected elements"
            page.wait_for_timeout(500)
            assert page.evaluate("typeof window.__xss") == "undefined", "a payload ran"
            shot(page, "tasks")
            return f"name and log shown as text; window.__xss undefined; no injected elements"
        flow(script_payloads_are_text)

        def artifacts_listed_with_download_links():
            r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": "ui-artifact", "artifacts": [{"name": "report.txt", "path": "report.txt"}], "shell": {"command": ["sh", "-c", "echo all good > report.txt"]}}})
            assert r["status"] == 200, r
            tid = r["body"]["task"]["id"]
            go(page, f"/tasks/{tid}")
            wait_for("SUCCEEDED", lambda: state_of(page, "#task-state") == "SUCCEEDED", timeout=60)
            link = page.wait_for_selector("a.download", timeout=20000)
            href = link.get_attribute("href")
            want = f"/api/v1/artifacts/{tid}%2Freport.txt/content"
            assert href == want, (href, want)
            assert "report.txt" in page.inner_text("main")
            return f"artifact listed, download link {href}"
        flow(artifacts_listed_with_download_links)

        def tasks_list_filters_and_live_rows():
            go(page, "/tasks")
            page.wait_for_selector("#task-rows tr")
            page.select_option("#filter-state", "FAILED")
            wait_for("only FAILED rows", lambda: page.eval_on_selector_all("#task-rows tr[data-task-id] .state", "es => es.length > 0 && es.every(e => e.textContent === 'FAILED')"), timeout=20)
            page.select_option("#filter-state", "")
            page.fill("#filter-label", "ui=live")
            page.dispatch_event("#filter-label", "change")
            wait_for("an empty list", lambda: page.query_selector("#task-rows td[colspan]"), timeout=20)
            r = api(page, "POST", "/api/v1/tasks", {"spec": {"name": "ui-live-row", "labels": {"ui": "live"}, "shell": {"command": ["sh", "-c", "sleep 1"]}}})
            tid = r["body"]["task"]["id"]
            row = f"#task-rows tr[data-task-id='{tid}'] .state"
            states = []

            def sample():
                el = page.query_selector(row)
                if el:
                    t = el.inner_text()
                    if not states or states[-1] != t:
                        states.append(t)
                return states and states[-1] == "SUCCEEDED"
            wait_for("the new row to reach SUCCEEDED", sample, timeout=60, every=0.05)
            assert len(states) >= 2, states
            # Paging with pageToken: pages of 3, forward and back.
            go(page, "/tasks?pageSize=3")
            page.wait_for_selector("#task-rows tr[data-task-id]")
            ids = lambda: page.eval_on_selector_all("#task-rows tr[data-task-id]", "es => es.map(e => e.dataset.taskId)")
            first = ids()
            assert len(first) == 3, first
            page.click("#next-page")
            wait_for("page 2", lambda: ids() and ids()[0] not in first)
            second = ids()
            assert not set(first) & set(second), (first, second)
            page.click("#prev-page")
            wait_for("page 1 again", lambda: ids() == first)
            r = api(page, "GET", "/api/v1/stats?windowMs=60000")
            b = r["body"]
            fin = sum(int(x.get("finished", 0)) for x in b["samples"])
            assert r["status"] == 200 and len(b["samples"]) == 12 and b["bucketMs"] == "5000" and fin >= 1, b
            return f"filter by state and label; live row states {states}; pages {first} / {second}; stats: {fin} finished in the last minute"
        flow(tasks_list_filters_and_live_rows)

        def modules_behave():
            out = page.evaluate("""async () => {
                const { Ansi } = await import('/ui/js/ansi.js');
                const { layout } = await import('/ui/js/dag.js');
                const { toYaml, prune } = await import('/ui/js/pages/templates.js');
                const a = new Ansi();
                const segs = a.segments('\x1b[1;31mred\x1b[0m plain \x1b[38;5;10mgreen\x1b[39m\x1b[2K');
                const carry = a.segments('\x1b[34mblue');
                const next = a.segments('still blue');
                const l = layout([{ name: 'a' }, { name: 'b', dependsOn: ['a'] }, { name: 'c', dependsOn: ['a'] }, { name: 'd', dependsOn: ['b', 'c'] }]);
                return {
                    segs, next,
                    layers: ['a', 'b', 'c', 'd'].map((n) => l.pos.get(n).layer),
                    yaml: toYaml(prune({ name: 'w', tasks: [{ name: 't', spec: { env: {}, priority: 0, shell: { command: ['sh', '-c', 'echo "hi"'] } } }], failurePolicy: 'FAILURE_POLICY_UNSPECIFIED' })),
                };
            }""")
            segs = out["segs"]
            assert segs[0] == {"text": "red", "cls": "ansi-fg-1 ansi-bold"}, segs
            assert segs[1] == {"text": " plain ", "cls": ""}, segs
            assert segs[2] == {"text": "green", "cls": "ansi-fg-10"}, segs
            assert len(segs) == 3, segs
            assert out["next"] == [{"text": "still blue", "cls": "ansi-fg-4"}], out
            assert out["layers"] == [0, 1, 1, 2], out
            assert "failurePolicy" not in out["yaml"] and "- name: t" in out["yaml"] and "'echo \"hi\"'" not in out["yaml"], out["yaml"]
            return f"ansi {segs}; layers {out['layers']}; yaml:\n{out['yaml']}"
        flow(modules_behave)

        def pages_render_and_screenshots():
            done = []
            r = api(page, "POST", "/api/v1/schedules", {"spec": {"name": "nightly-lines", "cron": "0 3 * * *", "timezone": "UTC", "template": "shell-task", "params": {"lines": "3"}}})
            assert r["status"] == 200, r
            for hash_path, sel, name in [
                ("/", "#leader", "overview"),
                ("/workflows", "table.list", "workflows"),
                ("/agents", "#agents", "agents"),
                ("/templates", "a.template-link", "templates"),
                ("/schedules", "tr[data-schedule-id] .next-fire", "schedules"),
                ("/config", "#tokens", "config"),
            ]:
                go(page, hash_path)
                page.wait_for_selector(sel, timeout=20000)
                if name == "agents":
                    assert page.query_selector(".drain-btn"), "an admin sees no Drain button"
                if name == "overview":
                    page.select_option("#chart-window", "120000")
                    wait_for("the chart", lambda: page.query_selector("svg.chart rect.bar-ok"), timeout=20)
                    assert page.inner_text("#leader").strip(), "no leader shown"
                shot(page, name)
                done.append(name)
            return f"pages {done}"
        flow(pages_render_and_screenshots)

        def schedule_pause_resume():
            go(page, "/schedules")
            row = "tr[data-schedule-id]"
            page.wait_for_selector(f"{row} .pause-btn")
            nxt = page.inner_text(f"{row} .next-fire")
            assert nxt[:2] == "20", f"next fire time {nxt!r}"
            page.click(f"{row} .pause-btn")
            page.wait_for_selector(f"{row} .state-paused")
            page.click(f"{row} .resume-btn")
            page.wait_for_selector(f"{row} .state-active")
            return f"next fire {nxt}; paused and resumed"
        flow(schedule_pause_resume)

        def admin_token_create_shows_secret_once():
            go(page, "/config")
            page.wait_for_selector("#create-token-form")
            page.fill("#create-token-form input[name=name]", "ui-made")
            page.click("#create-token-btn")
            secret = page.wait_for_selector("#new-secret").inner_text()
            assert secret.startswith("scbd_"), secret
            row = page.wait_for_selector("#tokens tr:has-text('ui-made')")
            assert secret not in page.inner_text("#tokens")
            row.query_selector(".revoke-btn").click()
            page.wait_for_selector("#tokens tr:has-text('ui-made') .state-revoked")
            go(page, "/config")
            page.wait_for_selector("#tokens")
            assert not page.query_selector("#new-secret"), "the secret is shown again"
            row = "tr[data-project=default]"
            page.wait_for_selector(f"{row} .save-project")
            page.fill(f"{row} input[name=maxQueuedTasks]", "1234")
            page.click(f"{row} .save-project")
            page.wait_for_selector(f"{row} .ok")
            q = api(page, "GET", "/api/v1/projects/default")["body"].get("quota", {})
            assert q.get("maxQueuedTasks") == 1234, q
            page.fill(f"{row} input[name=maxQueuedTasks]", "0")
            page.click(f"{row} .save-project")
            return f"created, secret shown once, revoked; project quota saved: {q}"
        flow(admin_token_create_shows_secret_once)

        def read_token_sees_no_controls():
            rp = ctx.new_page()
            CURRENT["page"] = rp
            rp.on("request", lambda r: requests.append(r.url))
            rp.on("pageerror", lambda e: errors.append(str(e)))
            login(rp, READ)
            assert rp.inner_text("#who-scope") == "read"
            checks = []
            go(rp, f"/tasks/{state['long_task']}")
            rp.wait_for_selector("#task-state")
            # A running task would show Cancel to a submitter: use a fresh one.
            r = api(rp, "POST", "/api/v1/tasks", {"spec": {"name": "ui-read-target", "shell": {"command": ["sh", "-c", "sleep 30"]}}})
            tid = r["body"]["task"]["id"]
            go(rp, f"/tasks/{tid}")
            wait_for("the task", lambda: state_of(rp, "#task-state") in ("QUEUED", "ASSIGNED", "RUNNING"))
            assert not rp.query_selector("#cancel-btn"); checks.append("no cancel")
            go(rp, "/templates/shell-task")
            rp.wait_for_selector("#render-btn")
            assert not rp.query_selector("#run-btn"); checks.append("no run")
            go(rp, "/config")
            rp.wait_for_selector("main section")
            rp.wait_for_timeout(1000)
            assert not rp.query_selector("#create-token-btn") and not rp.query_selector(".revoke-btn"); checks.append("no token create/revoke")
            assert not rp.query_selector(".save-project"); checks.append("no project edit")
            go(rp, "/agents")
            rp.wait_for_selector("#agents")
            assert not rp.query_selector(".drain-btn"); checks.append("no drain")
            shot(rp, "read-only-agents")
            refused = {
                "cancel": api(rp, "POST", f"/api/v1/tasks/{tid}/cancel", {}, READ)["status"],
                "submit": api(rp, "POST", "/api/v1/tasks", {"spec": {"name": "x", "shell": {"command": ["true"]}}}, READ)["status"],
                "run": api(rp, "POST", "/api/v1/templates/shell-task/run", {"params": {}}, READ)["status"],
                "create token": api(rp, "POST", "/api/v1/tokens", {"kind": "TOKEN_KIND_API", "name": "n", "scopes": ["SCOPE_READ"]}, READ)["status"],
                "revoke": api(rp, "POST", "/api/v1/tokens/nope/revoke", {}, READ)["status"],
                "drain": api(rp, "POST", "/api/v1/agents/w0/drain", {}, READ)["status"],
            }
            assert all(s == 403 for s in refused.values()), refused
            api(rp, "POST", f"/api/v1/tasks/{tid}/cancel", {})
            rp.close()
            CURRENT["page"] = page
            return f"{checks}; API refused: {refused}"
        flow(read_token_sees_no_controls)

        def drain_and_undrain_controls():
            # Last of the flows that run tasks: the worker stays drained if undrain is missing.
            go(page, "/agents")
            page.wait_for_selector("#agents .drain-btn")
            page.click("#agents .drain-btn")
            page.wait_for_selector("#agents .undrain-btn")
            assert "DRAINING" in page.inner_text("#agents")
            page.click("#agents .undrain-btn")
            # POST /api/v1/agents/{id}/undrain comes with the `agents` part: until then the
            # page shows the API's error as text.
            got = wait_for("undrained, or the API's error", lambda: (page.query_selector("#agents .drain-btn") and "undrained") or (page.query_selector("main .error") and page.inner_text("main .error")), timeout=20)
            return f"drained; undrain: {got}"
        flow(drain_and_undrain_controls)

        def only_the_controller_is_contacted():
            hosts = sorted({urlparse(u).netloc for u in requests if not u.startswith(("data:", "blob:"))})
            assert hosts == [host], f"requests went to {hosts}"
            return f"{len(requests)} requests, all to {host}"
        flow(only_the_controller_is_contacted)

        def no_script_errors_or_csp_violations():
            csp = page.evaluate("window.__csp || []")
            assert not errors, errors
            assert not csp and not violations, (csp, violations)
            return "no page errors, no CSP violations"
        flow(no_script_errors_or_csp_violations)
        browser.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        report("driver", False, f"{e}\n{traceback.format_exc()}")
        sys.exit(1)
