// Tasks: filter by state, project and label; paging with pageToken; live updates from
// /api/v1/events (rows change state in place, new tasks appear on the first page).

import { get, qs } from '../api.js';
import { h, clear, badge, taskState, fmtTime, labelsText, errorBox, table } from '../dom.js';
import { stream } from '../sse.js';
import { hashQuery } from '../router.js';

export const name = 'tasks';
const STATES = ['', 'QUEUED', 'ASSIGNED', 'RUNNING', 'RETRY_WAIT', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT'];

export function render(root) {
  const q = hashQuery();
  const state = h('select', { id: 'filter-state' }, STATES.map((x) => h('option', { value: x, text: x || 'any state', selected: x === (q.get('state') || '') })));
  const project = h('input', { id: 'filter-project', placeholder: 'project', value: q.get('project') || '' });
  const label = h('input', { id: 'filter-label', placeholder: 'label key=value', value: q.get('label') || '' });
  const err = h('div');
  const tbody = h('tbody', { id: 'task-rows' });
  const pager = h('div', { class: 'pager' });
  const pageSize = Math.min(500, Number(q.get('pageSize')) || 25);
  const tokens = [''];
  let page = 0;
  const rows = new Map();
  const filters = () => ({ states: state.value ? `TASK_STATE_${state.value}` : '', project: project.value.trim(), label: label.value.trim() });
  const matches = (t) => {
    const f = filters();
    if (f.states && t.state !== f.states) return false;
    if (f.project && t.project !== f.project) return false;
    if (f.label) {
      const [k, v] = f.label.split('=');
      if ((t.spec?.labels || {})[k] !== v) return false;
    }
    return true;
  };
  const row = (t) => h('tr', { dataset: { taskId: t.id } },
    h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(t.id)}`, class: 'mono', text: t.id })),
    h('td', { class: 'task-name', text: t.spec?.name || t.workflowNode || '' }),
    h('td', { class: 'state' }, badge(taskState(t))),
    h('td', { text: t.project || '' }),
    h('td', { text: labelsText(t.spec?.labels) }),
    h('td', { text: fmtTime(t.createdAtMs) }),
    h('td', {}, t.workflowId ? h('a', { href: `#/workflows/${encodeURIComponent(t.workflowId)}`, text: t.workflowNode || t.workflowId }) : ''));
  const load = async () => {
    clear(err);
    try {
      const f = filters();
      const r = await get(`/api/v1/tasks${qs({ ...f, pageSize, pageToken: tokens[page] })}`);
      clear(tbody);
      rows.clear();
      for (const t of r.tasks || []) { const tr = row(t); rows.set(t.id, tr); tbody.append(tr); }
      if (!rows.size) tbody.append(h('tr', {}, h('td', { colspan: 7, class: 'muted', text: 'No tasks.' })));
      tokens[page + 1] = r.nextPageToken || '';
      clear(pager).append(
        h('button', { id: 'prev-page', disabled: page === 0, on: { click: () => { page -= 1; load(); } } }, '← Newer'),
        h('span', { class: 'muted', text: ` page ${page + 1} ` }),
        h('button', { id: 'next-page', disabled: !r.nextPageToken, on: { click: () => { page += 1; load(); } } }, 'Older →'));
    } catch (e) { err.append(errorBox(e)); }
  };
  const refilter = () => { tokens.length = 1; page = 0; load(); };
  for (const el of [state, project, label]) el.addEventListener('change', refilter);
  root.append(h('h1', { text: 'Tasks' }),
    h('div', { class: 'filters' }, state, project, label, h('button', { on: { click: refilter } }, 'Apply')),
    err,
    table(['ID', 'Name', 'State', 'Project', 'Labels', 'Created', 'Workflow'], [], { class: 'list' }),
    pager);
  root.querySelector('table').replaceChild(tbody, root.querySelector('tbody'));
  load();
  const live = stream('/api/v1/events', {
    reconnect: true,
    onEvent: (ev) => {
      if (ev.event !== 'task') return;
      let t;
      try { t = JSON.parse(ev.data).task; } catch (_) { return; }
      if (!t) return;
      const old = rows.get(t.id);
      if (old) { const tr = row(t); old.replaceWith(tr); rows.set(t.id, tr); }
      else if (page === 0 && matches(t)) {
        const empty = tbody.querySelector('td[colspan]');
        if (empty) empty.parentElement.remove();
        const tr = row(t); rows.set(t.id, tr); tbody.prepend(tr);
      }
    },
    onError: (e) => { clear(err).append(errorBox(e)); },
  });
  return () => live.close();
}
