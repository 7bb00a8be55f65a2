// One workflow: the DAG (nodes recoloured live from /api/v1/workflows/<id>/events),
// done/total, durations, per-node links to the task and its log, Cancel.

import { get, post, can, enc } from '../api.js';
import { h, clear, badge, enumName, fmtTime, fmtDur, errorBox, section, table } from '../dom.js';
import { stream } from '../sse.js';
import { drawDag } from '../dag.js';

export const name = 'workflow';
const FINAL = ['SUCCEEDED', 'FAILED', 'CANCELLED'];
const NODE_FINAL = ['SUCCEEDED', 'FAILED', 'CANCELLED', 'SKIPPED'];

export function render(root, { id }) {
  const head = h('div');
  const err = h('div');
  const graph = h('div', { class: 'dag-box' });
  const nodes = h('div');
  root.append(head, err, section('Graph', graph), section('Nodes', nodes));
  let dag = null;
  const durations = new Map();
  const fetchDuration = async (n) => {
    if (durations.has(n.taskId)) return;
    durations.set(n.taskId, '…');
    try {
      const t = await get(`/api/v1/tasks/${enc(n.taskId)}`);
      const a = (t.attempts || []).at(-1);
      durations.set(n.taskId, a && a.startedAtMs ? fmtDur(Number(a.finishedAtMs || Date.now()) - Number(a.startedAtMs)) : '');
    } catch (_) { durations.set(n.taskId, ''); }
  };
  const draw = (w) => {
    const st = enumName(w.state, 'WORKFLOW_STATE_');
    clear(head).append(
      h('h1', {}, h('span', { id: 'wf-name', text: w.spec?.name || w.id }), ' ', h('span', { id: 'wf-state', dataset: { state: st } }, badge(st))),
      h('p', { class: 'muted' }, h('span', { class: 'mono', text: w.id }),
        ` · project ${w.project || ''} · `, h('strong', { id: 'wf-progress', text: `${w.done || 0}/${w.total || 0} done` }),
        ` · started ${fmtTime(w.createdAtMs)} · ${fmtDur((Number(w.finishedAtMs) || Date.now()) - Number(w.createdAtMs))}`,
        w.template?.name ? ` · template ${w.template.name} v${w.template.version || ''}` : ''),
      w.message ? h('p', { class: st === 'FAILED' ? 'error' : 'muted', id: 'wf-message', text: w.message }) : '',
      can('submit') && !FINAL.includes(st) ? h('button', { id: 'wf-cancel-btn', class: 'danger', on: { click: cancel } }, 'Cancel workflow') : '');
    if (!dag) { dag = drawDag(w); graph.append(dag.svg); } else dag.update(w);
    const pending = [];
    const rows = (w.nodes || []).map((n) => {
      const ns = enumName(n.state, 'NODE_STATE_');
      if (n.taskId && NODE_FINAL.includes(ns) && !durations.has(n.taskId)) pending.push(fetchDuration(n));
      return h('tr', { dataset: { node: n.name } },
        h('td', { text: n.name }),
        h('td', {}, badge(ns)),
        h('td', { text: (n.dependsOn || []).join(', ') }),
        h('td', { text: ns === 'FAILED' ? String(n.exitCode || 0) : '' }),
        h('td', { text: durations.get(n.taskId) || '' }),
        h('td', { text: n.message || '' }),
        h('td', {}, n.taskId ? h('a', { href: `#/tasks/${enc(n.taskId)}`, class: 'mono', text: 'task & log' }) : ''));
    });
    clear(nodes).append(table(['Node', 'State', 'Depends on', 'Exit', 'Duration', 'Message', ''], rows));
    if (pending.length) Promise.all(pending).then(() => draw(w));
  };
  const cancel = async () => {
    try { draw(await post(`/api/v1/workflows/${enc(id)}/cancel`, {})); } catch (e) { clear(err).append(errorBox(e)); }
  };
  get(`/api/v1/workflows/${enc(id)}`).then(draw).catch((e) => err.append(errorBox(e)));
  const live = stream(`/api/v1/workflows/${enc(id)}/events`, {
    reconnect: false,
    onEvent: (ev) => { if (ev.event === 'workflow') { try { const w = JSON.parse(ev.data).workflow; if (w) draw(w); } catch (_) { /* ignore */ } } },
    onError: (e) => clear(err).append(errorBox(e)),
  });
  return () => live.close();
}
