"""MCP client driver for tests/tests/mcp.rs: the official Python SDK (PyPI `mcp`) talking
to `scabbard mcp` over stdio, or to the streamable-HTTP service, against a real controller.

Usage: driver.py SCENARIO (see SCENARIOS below). Settings come from the environment:
SCABBARD_BIN, SCABBARD_CONTROLLER, SCABBARD_TOKEN, and per scenario MCP_* variables.
Each check prints `ok: <what>`; the first failed check raises (exit code 1), so the Rust
test sees which one failed.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TIMEOUT = 90


def ok(what):
    print(f"ok: {what}", flush=True)


def check(cond, what, detail=""):
    if not cond:
        raise AssertionError(f"FAILED: {what} {detail}")
    ok(what)


def text_of(result):
    return "\n".join(getattr(c, "text", "") for c in result.content)


class Notes:
    """Server notifications received, with an event to wait for new ones."""

    def __init__(self):
        self.items = []
        self.changed = asyncio.Event()

    async def handler(self, message):
        if isinstance(message, Exception):
            return
        self.items.append(message)
        self.changed.set()

    async def wait_for(self, pred, what, timeout=TIMEOUT):
        async def loop():
            while True:
                for m in self.items:
                    if pred(m):
                        return m
                self.changed.clear()
                await self.changed.wait()

        try:
            return await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"FAILED: {what}: not received within {timeout}s; got {[type(m).__name__ for m in self.items]}")


def method_of(m):
    inner = getattr(m, "root", m)
    return getattr(inner, "method", None), getattr(inner, "params", None)


async def session(run, transport="stdio"):
    notes = Notes()
    if transport == "http":
        from mcp.client.streamable_http import streamable_http_client
        import httpx2

        client = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {os.environ['SCABBARD_TOKEN']}"}, timeout=TIMEOUT
        )
        async with client:
            async with streamable_http_client(os.environ["MCP_HTTP_URL"], http_client=client) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write, message_handler=notes.handler) as s:
                    await s.initialize()
                    ok("initialize (http)")
                    await run(s, notes)
        return
    params = StdioServerParameters(
        command=os.environ["SCABBARD_BIN"],
        args=["mcp", "--controller", os.environ["SCABBARD_CONTROLLER"]]
        + [a for a in os.environ.get("MCP_EXTRA_ARGS", "").split("\n") if a],
        env={"SCABBARD_TOKEN": os.environ["SCABBARD_TOKEN"], "HOME": os.environ.get("HOME", "/tmp")},
    )
    async with stdio_client(params) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write, message_handler=notes.handler) as s:
            init = await s.initialize()
            check(init.capabilities.tools is not None, "initialize: tools capability")
            await run(s, notes)


async def tool_map(s):
    return {t.name: t for t in (await s.list_tools()).tools}


async def main_scenario(s, notes):
    tools = await tool_map(s)
    for name in ["list_templates", "describe_template", "render_template", "run_template", "submit_task",
                 "get_task", "list_tasks", "task_logs", "cancel_task", "get_workflow", "cancel_workflow",
                 "list_agents", "cluster_status"]:
        check(name in tools, f"tool {name} listed")
    for builtin in ["run_ci_pipeline", "run_data_processing", "run_ml_training", "run_scheduled_maintenance"]:
        check(builtin in tools, f"typed tool {builtin} listed")
    ci = tools["run_ci_pipeline"].input_schema
    props = ci["properties"]
    check("repository" in ci.get("required", []), "run_ci_pipeline: repository required")
    check(props["go_version"].get("enum") == ["1.22", "1.23"], "run_ci_pipeline: go_version enum", props["go_version"])
    check("https?|git|ssh" in props["repository"].get("pattern", ""), "run_ci_pipeline: repository pattern", props["repository"])
    check(props["packages"]["type"] == "array" and "pattern" in props["packages"]["items"], "run_ci_pipeline: packages list of patterned strings")
    check(props["parallelism"]["type"] == "integer", "run_ci_pipeline: parallelism integer")
    greet = tools["run_greet"].input_schema["properties"]
    check(greet["times"].get("minimum") == 1 and greet["times"].get("maximum") == 5, "run_greet: times min/max", greet["times"])
    check(tools["get_task"].annotations.read_only_hint is True, "get_task: readOnlyHint")
    check(all(t.output_schema for n, t in tools.items()), "every tool has an output schema", [n for n, t in tools.items() if not t.output_schema])
    check(tools["cancel_task"].annotations.destructive_hint is True, "cancel_task: destructiveHint")
    check(tools["cancel_workflow"].annotations.idempotent_hint is True, "cancel_workflow: idempotentHint")

    # A dry run with bad parameters: every error, each naming its parameter.
    r = await s.call_tool("render_template", {"name": "ci-pipeline", "params": {"repository": "not-a-url", "go_version": "0.1"}})
    t = text_of(r)
    check(r.is_error, "render_template with bad parameters: isError")
    check("repository" in t and "go_version" in t, "render_template: the error names each bad parameter", t)
    r = await s.call_tool("render_template", {"name": "ci-pipeline", "params": {"repository": "https://github.com/example/app.git"}})
    check(not r.is_error and "tasks:" in r.structured_content["yaml"], "render_template: YAML of the workflow")

    # run_template with wait: progress (done/total) while it runs, then SUCCEEDED.
    progress = []

    async def on_progress(p, total, message):
        progress.append((p, total))

    r = await s.call_tool("run_template", {"name": "greet", "params": {"who": "ada", "times": 3}, "wait": True},
                          progress_callback=on_progress)
    check(not r.is_error, "run_template wait: no error", text_of(r))
    wf = r.structured_content["workflow"]
    check(wf["state"] == "succeeded", "run_template wait: workflow SUCCEEDED", wf["state"])
    check(len(progress) >= 1 and progress[-1] == (2, 2), "run_template wait: progress notifications done/total", progress)
    shout = next(n for n in wf["nodes"] if n["name"] == "shout")

    # The logs resource (and task_logs) give the task's output.
    res = await s.read_resource(f"scabbard://tasks/{shout['task_id']}/logs")
    log = res.contents[0].text
    check(log.count("hello-ada") == 3, "logs resource: the task's output", log)
    r = await s.call_tool("task_logs", {"id": shout["task_id"], "max_bytes": 5})
    sc = r.structured_content
    check(sc["text"] == "hello" and sc["truncated"], "task_logs max_bytes caps the text", sc)
    r = await s.call_tool("task_logs", {"id": shout["task_id"], "tail_lines": 1})
    check(r.structured_content["text"].strip() == "hello-ada", "task_logs tail_lines=1", r.structured_content)
    res = await s.read_resource(f"scabbard://workflows/{wf['id']}")
    check(json.loads(res.contents[0].text)["state"] == "succeeded", "workflow resource")
    res = await s.read_resource("scabbard://templates/greet")
    check(json.loads(res.contents[0].text)["name"] == "greet", "template resource")
    rt = await s.list_resource_templates()
    uris = sorted(t.uri_template for t in rt.resource_templates)
    check(uris == sorted(["scabbard://tasks/{id}", "scabbard://tasks/{id}/logs", "scabbard://workflows/{id}", "scabbard://templates/{name}"]), "resource templates", uris)

    # A typed template tool runs the same template.
    r = await s.call_tool("run_greet", {"who": "bob", "wait": True})
    check(not r.is_error and r.structured_content["workflow"]["state"] == "succeeded", "run_greet (typed tool) wait: SUCCEEDED", text_of(r))
    r = await s.call_tool("run_greet", {"who": "BAD", "times": 9})
    check(r.is_error and "who" in text_of(r) and "times" in text_of(r), "run_greet with bad parameters: isError naming them", text_of(r))

    # A subscribed task sends resources/updated when it finishes.
    r = await s.call_tool("submit_task", {"script": "sleep 1; echo finished", "name": "sub"})
    check(not r.is_error, "submit_task", text_of(r))
    task_id = r.structured_content["task"]["id"]
    uri = f"scabbard://tasks/{task_id}"
    await s.subscribe_resource(uri)

    async def finished():
        while True:
            await notes.wait_for(lambda m: method_of(m)[0] == "notifications/resources/updated" and method_of(m)[1].uri == uri,
                                 "resources/updated for the subscribed task")
            g = await s.call_tool("get_task", {"id": task_id})
            if g.structured_content["state"] == "succeeded":
                return
            notes.items = [m for m in notes.items if method_of(m)[0] != "notifications/resources/updated"]

    await asyncio.wait_for(finished(), TIMEOUT)
    ok("subscribed task: resources/updated when it finished")
    # And a subscribed workflow, when it finishes.
    r = await s.call_tool("run_template", {"name": "greet", "params": {"who": "wf"}})
    wf_id = r.structured_content["workflow"]["id"]
    wf_uri = f"scabbard://workflows/{wf_id}"
    await s.subscribe_resource(wf_uri)

    async def wf_finished():
        while True:
            await notes.wait_for(lambda m: method_of(m)[0] == "notifications/resources/updated" and method_of(m)[1].uri == wf_uri,
                                 "resources/updated for the subscribed workflow")
            g = await s.call_tool("get_workflow", {"id": wf_id})
            if g.structured_content["state"] == "succeeded":
                return
            notes.items = [m for m in notes.items if method_of(m)[0] != "notifications/resources/updated"]

    await asyncio.wait_for(wf_finished(), TIMEOUT)
    ok("subscribed workflow: resources/updated when it finished")
    await s.unsubscribe_resource(wf_uri)
    await s.unsubscribe_resource(uri)

    r = await s.call_tool("list_tasks", {"states": ["succeeded"], "page_size": 2})
    check(not r.is_error and len(r.structured_content["tasks"]) == 2 and r.structured_content["next_page_token"], "list_tasks: paged and filtered")
    r = await s.call_tool("list_tasks", {"states": ["sleeping"]})
    check(r.is_error and "states" in text_of(r), "list_tasks with a bad state: isError naming states")
    r = await s.call_tool("list_agents", {})
    check(not r.is_error and len(r.structured_content["agents"]) >= 1, "list_agents")
    r = await s.call_tool("cluster_status", {})
    check(not r.is_error and r.structured_content["store_healthy"], "cluster_status")


async def readonly_scenario(s, notes):
    tools = await tool_map(s)
    for name in ["run_template", "submit_task", "cancel_task", "cancel_workflow"]:
        check(name not in tools, f"read token: {name} not listed")
    check(not any(n.startswith("run_") for n in tools), "read token: no run_* tools", sorted(tools))
    check("get_task" in tools and "list_templates" in tools, "read token: read tools listed")
    r = await s.call_tool("run_template", {"name": "greet", "params": {"who": "eve"}})
    check(r.is_error and "PERMISSION_DENIED" in text_of(r), "read token: run_template refused by the controller", text_of(r))
    r = await s.call_tool("submit_task", {"script": "true"})
    check(r.is_error and "PERMISSION_DENIED" in text_of(r), "read token: submit_task refused", text_of(r))


async def project_scenario(s, notes):
    other = os.environ["MCP_OTHER_TASK"]
    for tool in ["get_task", "task_logs", "cancel_task"]:
        r = await s.call_tool(tool, {"id": other})
        check(r.is_error, f"project token: {tool} on another project's task is refused", text_of(r))
    for uri in [f"scabbard://tasks/{other}", f"scabbard://tasks/{other}/logs"]:
        try:
            await s.read_resource(uri)
            raise AssertionError(f"FAILED: project token read {uri}")
        except AssertionError:
            raise
        except Exception as e:  # the SDK raises McpError for an error response
            ok(f"project token: resource {uri} refused ({e})")
    try:
        await s.subscribe_resource(f"scabbard://tasks/{other}")
        raise AssertionError("FAILED: project token subscribed to another project's task")
    except AssertionError:
        raise
    except Exception:
        ok("project token: subscribe to another project's task refused")
    r = await s.call_tool("list_tasks", {})
    ids = [t["id"] for t in r.structured_content["tasks"]]
    check(other not in ids, "project token: list_tasks does not show the other project's task")
    r = await s.call_tool("list_tasks", {"project": "proj-b"})
    check(r.is_error, "project token: list_tasks of project B is refused", text_of(r))
    wf = os.environ["MCP_OTHER_WORKFLOW"]
    for tool in ["get_workflow", "cancel_workflow"]:
        r = await s.call_tool(tool, {"id": wf})
        check(r.is_error, f"project token: {tool} on another project's workflow is refused", text_of(r))
    try:
        await s.read_resource(f"scabbard://workflows/{wf}")
        raise AssertionError("FAILED: project token read another project's workflow")
    except AssertionError:
        raise
    except Exception as e:
        ok(f"project token: workflow resource refused ({e})")
    r = await s.call_tool("run_template", {"name": "greet", "params": {"who": "eve"}, "project": "proj-b"})
    check(r.is_error, "project token: run_template into project B is refused", text_of(r))


async def ratelimit_scenario(s, notes):
    # The SDK lists tools once to learn the output schemas; list them first (retrying while
    # the startup check used up the burst) so the calls below are the only requests.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await s.list_tools()
            break
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
    texts = []
    for _ in range(10):
        r = await s.call_tool("list_tasks", {})
        if r.is_error:
            texts.append(text_of(r))
    check(any("RESOURCE_EXHAUSTED" in t for t in texts), "rate limit: calls past the project's burst are refused", texts)


async def tls_scenario(s, notes):
    # `scabbard mcp` reached the controller over TLS: tools listed, calls answered.
    tools = await tool_map(s)
    check("run_template" in tools and "cluster_status" in tools, "tls: tools listed", sorted(tools))
    r = await s.call_tool("cluster_status", {})
    check(not r.is_error, "tls: cluster_status over TLS", text_of(r))
    r = await s.call_tool("list_templates", {})
    check(not r.is_error and "ci_pipeline" in text_of(r), "tls: list_templates over TLS", text_of(r))


async def list_changed_scenario(s, notes):
    tools = await tool_map(s)
    new = os.environ["MCP_NEW_TOOL"]
    check(new not in tools, f"{new} not listed before the restart")
    print("READY", flush=True)
    await notes.wait_for(lambda m: method_of(m)[0] == "notifications/tools/list_changed", "tools/list_changed", timeout=120)
    ok("tools/list_changed after the template list changed")
    tools = await tool_map(s)
    check(new in tools, f"{new} listed after the restart", sorted(tools))


async def http_scenario(s, notes):
    # Without a bearer token nothing is served.
    from mcp.client.streamable_http import streamable_http_client
    import httpx2

    refused = None
    async with httpx2.AsyncClient(timeout=TIMEOUT) as bare:
        async with streamable_http_client(os.environ["MCP_HTTP_URL"], http_client=bare) as streams:
            async with ClientSession(streams[0], streams[1]) as s2:
                await s2.initialize()
                try:
                    await s2.list_tools()
                except Exception as e:  # McpError: the error response
                    refused = str(e)
    check(refused is not None and "Authorization: Bearer" in refused, "http: no token, no tools", refused)
    tools = await tool_map(s)
    check("run_ci_pipeline" in tools and "run_greet" in tools, "http: typed template tools listed")
    progress = []

    async def on_progress(p, total, message):
        progress.append((p, total))

    r = await s.call_tool("run_template", {"name": "greet", "params": {"who": "hal"}, "wait": True},
                          progress_callback=on_progress)
    check(not r.is_error and r.structured_content["workflow"]["state"] == "succeeded", "http: run_template wait SUCCEEDED", text_of(r))
    check(progress and progress[-1] == (2, 2), "http: progress notifications done/total", progress)


SCENARIOS = {
    "main": main_scenario,
    "readonly": readonly_scenario,
    "project": project_scenario,
    "list_changed": list_changed_scenario,
    "ratelimit": ratelimit_scenario,
    "ratelimit_http": ratelimit_scenario,
    "tls": tls_scenario,
    "http": http_scenario,
}

if __name__ == "__main__":
    name = sys.argv[1]
    transport = "http" if name in ("http", "ratelimit_http") else "stdio"
    asyncio.run(asyncio.wait_for(session(SCENARIOS[name], transport), 300))
    print("PASS", flush=True)
