// Workflows (the progress tracker): the list with state, done/total and duration; filter by
// state and project; paging.

import { get, qs, enc } from '../api.js';
import { h, clear, badge, enumName, fmtTime, fmtDur, errorBox, table } from '../dom.js';

export const name = 'workflows';
const STATES = ['', 'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED'];

export function render(root) {
  const state = h('select', { id: 'wf-filter-state' }, STATES.map((x) => h('option', { value: x, text: x || 'any state' })));
  const project = h('input', { placeholder: 'project' });
  const out = h('div');
  const tokens = [''];
  let page = 0;
  let stop = false;
  const load = async () => {
    try {
      const r = await get(`/api/v1/workflows${qs({ states: state.value ? `WORKFLOW_STATE_${state.value}` : '', project: project.value.trim(), pageSize: 25, pageToken: tokens[page] })}`);
      if (stop) return;
      tokens[page + 1] = r.nextPageToken || '';
      const rows = (r.workflows || []).map((w) => h('tr', { dataset: { workflowId: w.id } },
        h('td', {}, h('a', { href: `#/workflows/${enc(w.id)}`, class: 'mono', text: w.id })),
        h('td', { text: w.spec?.name || w.template?.name || '' }),
        h('td', {}, badge(enumName(w.state, 'WORKFLOW_STATE_'))),
        h('td', { text: `${w.done || 0}/${w.total || 0}` }),
        h('td', { text: w.project || '' }),
        h('td', { text: fmtTime(w.createdAtMs) }),
        h('td', { text: fmtDur((Number(w.finishedAtMs) || Date.now()) - Number(w.createdAtMs)) })));
      clear(out).append(
        rows.length ? table(['ID', 'Name', 'State', 'Done', 'Project', 'Created', 'Duration'], rows, { class: 'list' }) : h('p', { class: 'muted', text: 'No workflows.' }),
        h('div', { class: 'pager' },
          h('button', { disabled: page === 0, on: { click: () => { page -= 1; load(); } } }, '← Newer'),
          h('button', { disabled: !r.nextPageToken, on: { click: () => { page += 1; load(); } } }, 'Older →')));
    } catch (e) { clear(out).append(errorBox(e)); }
  };
  const refilter = () => { tokens.length = 1; page = 0; load(); };
  state.addEventListener('change', refilter);
  project.addEventListener('change', refilter);
  root.append(h('h1', { text: 'Workflows' }), h('div', { class: 'filters' }, state, project), out);
  load();
  const timer = setInterval(() => { if (page === 0) load(); }, 5000);
  return () => { stop = true; clearInterval(timer); };
}
