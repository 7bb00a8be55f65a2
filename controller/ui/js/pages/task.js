// Task detail: spec, attempts, live state (/api/v1/events?ids=<id>), the live log of the
// latest attempt (/api/v1/tasks/<id>/logs?follow=true) with ANSI colours, line numbers and
// search, artifacts with downloads, and Cancel (submit scope, while not final).

import { get, post, can, enc, download, qs } from '../api.js';
import { h, clear, badge, taskState, FINAL_TASK, fmtTime, fmtDur, fmtBytes, labelsText, enumName, errorBox, section, table } from '../dom.js';
import { stream } from '../sse.js';
import { Ansi } from '../ansi.js';

export const name = 'task';

export function render(root, { id }) {
  const head = h('div', { class: 'task-head' });
  const err = h('div', { id: 'task-error' });
  const attempts = h('div');
  const specBox = h('div');
  const arts = h('div');
  const log = logView();
  root.append(head, err, h('div', { class: 'grid' }, section('Attempts', attempts), section('Spec', specBox)), section('Artifacts', arts), log.el);
  let task = null;
  let logAttempt = 0;
  let logStream = null;
  // Snapshots of the task come from three places that race: the first GET, the live
  // events, and the answer to Cancel. An answer can arrive after an event that is newer
  // than it (the cancel ended the attempt before the browser read the POST's reply):
  // drawing it would show RUNNING and "Cancel requested…" for good, as no event follows a
  // final state. So a snapshot older than the one shown is dropped.
  const stale = (t) => task && (
    (FINAL_TASK.includes(taskState(task)) && !FINAL_TASK.includes(taskState(t)))
    || Number(t.updatedAtMs || 0) < Number(task.updatedAtMs || 0));
  const draw = (t) => {
    if (stale(t)) return;
    task = t;
    const st = taskState(t);
    clear(head).append(
      h('h1', {}, h('span', { id: 'task-name', text: t.spec?.name || t.workflowNode || t.id }), ' ', h('span', { id: 'task-state', dataset: { state: st } }, badge(st))),
      h('p', { class: 'muted' },
        h('span', { class: 'mono', text: t.id }),
        ` · project ${t.project || ''} · created ${fmtTime(t.createdAtMs)}`,
        t.workflowId ? h('span', {}, ' · workflow ', h('a', { href: `#/workflows/${enc(t.workflowId)}`, text: `${t.workflowId} (${t.workflowNode})` })) : ''),
      t.result?.message ? h('p', { class: st === 'SUCCEEDED' ? 'muted' : 'error', id: 'task-message', text: t.result.message }) : '',
      can('submit') && !FINAL_TASK.includes(st)
        ? h('button', { id: 'cancel-btn', class: 'danger', on: { click: cancel } }, t.cancelRequested ? 'Cancel requested…' : 'Cancel task')
        : '');
    clear(attempts).append(table(['#', 'Agent', 'Started', 'Finished', 'Duration', 'Exit', 'Error class', 'Log'],
      (t.attempts || []).map((a) => h('tr', { dataset: { attempt: a.number } },
        h('td', { text: String(a.number) }),
        h('td', { class: 'mono', text: a.agentId || '' }),
        h('td', { text: fmtTime(a.startedAtMs) }),
        h('td', { text: fmtTime(a.finishedAtMs) }),
        h('td', { text: a.startedAtMs ? fmtDur((Number(a.finishedAtMs) || Date.now()) - Number(a.startedAtMs)) : '' }),
        h('td', { class: 'exit-code', text: a.result ? String(a.result.exitCode || 0) : '' }),
        h('td', { text: a.result && a.result.errorClass && a.result.errorClass !== 'ERROR_CLASS_UNSPECIFIED' ? enumName(a.result.errorClass, 'ERROR_CLASS_') : '—' }),
        h('td', {}, h('button', { class: 'link', on: { click: () => openLog(a.number) } }, 'show'))))));
    const spec = t.spec || {};
    clear(specBox).append(h('dl', { class: 'kv' },
      h('dt', { text: 'Command' }), h('dd', { class: 'mono', text: JSON.stringify(spec.shell?.command || spec.container || spec.daggerCall || (spec.noop ? 'noop' : '')) }),
      h('dt', { text: 'Labels' }), h('dd', { text: labelsText(spec.labels) }),
      h('dt', { text: 'Priority' }), h('dd', { text: String(spec.priority || 0) }),
      h('dt', { text: 'Timeout' }), h('dd', { text: spec.timeoutMs ? fmtDur(spec.timeoutMs) : 'none' }),
      h('dt', { text: 'Requirements' }), h('dd', { class: 'mono', text: JSON.stringify(spec.requirements || {}) })));
    const last = (t.attempts || []).at(-1);
    if (last && Number(last.number) !== logAttempt && (!logStream || !FINAL_TASK.includes(st))) openLog(Number(last.number));
    if (FINAL_TASK.includes(st)) loadArtifacts();
  };
  const openLog = (n) => {
    if (logStream) logStream.close();
    logAttempt = n;
    log.reset(n);
    logStream = stream(`/api/v1/tasks/${enc(id)}/logs${qs({ attempt: n, follow: true })}`, {
      onEvent: (ev) => { if (ev.event === 'log') { try { log.chunk(JSON.parse(ev.data)); } catch (_) { /* bad chunk */ } } },
      onError: (e) => log.error(e),
      onEnd: () => log.end(),
    });
  };
  const loadArtifacts = async () => {
    try {
      const r = await get(`/api/v1/artifacts${qs({ taskId: id })}`);
      const list = r.artifacts || [];
      clear(arts).append(list.length ? table(['Name', 'Size', 'sha256', ''], list.map((a) => h('tr', {},
        h('td', { text: a.name }), h('td', { text: fmtBytes(a.size) }), h('td', { class: 'mono', text: (a.sha256 || '').slice(0, 16) }),
        h('td', {}, h('a', {
          href: `/api/v1/artifacts/${enc(`${a.taskId}/${a.name}`)}/content`,
          class: 'download',
          on: { click: (e) => { e.preventDefault(); download(e.currentTarget.getAttribute('href'), a.name).catch((x) => arts.append(errorBox(x))); } },
        }, 'download'))))) : h('p', { class: 'muted', text: 'No artifacts.' }));
    } catch (e) { clear(arts).append(errorBox(e)); }
  };
  const cancel = async () => {
    try { draw(await post(`/api/v1/tasks/${enc(id)}/cancel`, { reason: 'cancelled from the web UI' })); } catch (e) { clear(err).append(errorBox(e)); }
  };
  get(`/api/v1/tasks/${enc(id)}`).then(draw).catch((e) => err.append(errorBox(e)));
  const live = stream(`/api/v1/events${qs({ ids: id })}`, {
    reconnect: true,
    onEvent: (ev) => { if (ev.event === 'task') { try { const t = JSON.parse(ev.data).task; if (t && t.id === id) draw(t); } catch (_) { /* ignore */ } } },
    onError: (e) => clear(err).append(errorBox(e)),
  });
  return () => { live.close(); if (logStream) logStream.close(); };
}

/** The log panel: numbered lines, ANSI colours, search (filters lines, counts hits). */
function logView() {
  const lines = h('div', { class: 'log', id: 'log' });
  const status = h('span', { class: 'muted', id: 'log-status' });
  const search = h('input', { id: 'log-search', type: 'search', placeholder: 'search the log' });
  const hits = h('span', { class: 'muted', id: 'log-hits' });
  const el = section('Log', h('div', { class: 'log-bar' }, search, hits, status), lines);
  let ansi = new Ansi();
  let dec = new TextDecoder();
  let partial = null;
  let n = 0;
  const applySearch = (line) => {
    const q = search.value.trim().toLowerCase();
    const on = !q || line.textContent.toLowerCase().includes(q);
    line.classList.toggle('hidden', !on);
    line.classList.toggle('hit', Boolean(q) && on);
    return on;
  };
  search.addEventListener('input', () => {
    let c = 0;
    for (const l of lines.children) if (applySearch(l) && search.value) c += 1;
    hits.textContent = search.value ? `${c} matching lines` : '';
  });
  const newLine = (stream) => {
    n += 1;
    const text = h('span', { class: 'text' });
    const line = h('div', { class: ['line', stream === 'LOG_STREAM_STDERR' ? 'stderr' : '', stream === 'LOG_STREAM_SYSTEM' ? 'system' : ''] }, h('span', { class: 'ln', text: String(n) }), text);
    lines.append(line);
    return { line, text, raw: '' };
  };
  const write = (str, streamName) => {
    const parts = str.split('\n');
    parts.forEach((p, i) => {
      if (!partial && p === '' && i === parts.length - 1) return;
      if (!partial) partial = newLine(streamName);
      partial.raw += p;
      if (i < parts.length - 1) {
        partial.text.append(ansi.render(partial.raw));
        applySearch(partial.line);
        partial = null;
      }
    });
  };
  return {
    el,
    reset(attempt) { lines.replaceChildren(); n = 0; partial = null; ansi = new Ansi(); dec = new TextDecoder(); status.textContent = ` attempt ${attempt} · following…`; },
    chunk(c) {
      const bytes = Uint8Array.from(atob(c.data || ''), (ch) => ch.charCodeAt(0));
      const stick = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 4;
      write(dec.decode(bytes, { stream: true }), c.stream);
      if (stick) lines.scrollTop = lines.scrollHeight;
    },
    end() {
      if (partial) { partial.text.append(ansi.render(partial.raw)); applySearch(partial.line); partial = null; }
      status.textContent = ` ${n} lines · complete`;
      el.dataset.complete = 'true';
    },
    error(e) { status.textContent = ''; el.append(errorBox(e)); },
  };
}
