// Overview: leader, controllers, store health, agents, queue depth per project, the
// throughput/latency chart (GET /api/v1/stats) and open breakers; refreshed every 5 s.

import { get } from '../api.js';
import { h, clear, section, table, badge, enumName, errorBox, fmtTime } from '../dom.js';
import { statsChart, legend } from '../chart.js';

export const name = 'overview';
const WINDOWS = [[120000, '2 min'], [300000, '5 min'], [900000, '15 min']];
let windowMs = 300000;

export function render(root) {
  root.append(h('h1', { text: 'Overview' }));
  const body = h('div', { class: 'grid' });
  root.append(body);
  let stop = false;
  const tick = async () => {
    const [cluster, agents, stats] = await Promise.allSettled([get('/api/v1/cluster'), get('/api/v1/agents'), get(`/api/v1/stats?windowMs=${windowMs}`)]);
    if (stop) return;
    clear(body);
    body.append(clusterCard(cluster), chartCard(stats), queueCard(cluster, stats), agentsCard(agents), breakersCard(cluster));
  };
  tick();
  document.addEventListener('scabbard:chart-window', tick);
  const timer = setInterval(tick, 5000);
  return () => { stop = true; clearInterval(timer); document.removeEventListener('scabbard:chart-window', tick); };
}

const fail = (title, r) => section(title, errorBox(r.reason));

function clusterCard(r) {
  if (r.status !== 'fulfilled') return fail('Cluster', r);
  const c = r.value;
  const rows = (c.members || []).map((m) => h('tr', {}, h('td', { text: m.address }), h('td', {}, m.leader ? badge('LEADER') : 'follower')));
  return section('Cluster',
    h('dl', { class: 'kv', id: 'cluster' },
      h('dt', { text: 'Leader' }), h('dd', { id: 'leader', text: c.leader || 'none elected' }),
      h('dt', { text: 'Answered by' }), h('dd', { text: c.answeredBy || '' }),
      h('dt', { text: 'Store' }), h('dd', {}, `${c.storeBackend || ''} `, c.storeHealthy ? badge('HEALTHY') : badge('UNHEALTHY'), c.storeError ? ` ${c.storeError}` : ''),
      h('dt', { text: 'Tasks' }), h('dd', { text: `${c.queuedTasks || 0} queued · ${c.activeTasks || 0} active · ${c.totalTasks || 0} in memory` }),
      h('dt', { text: 'Workflows' }), h('dd', { text: `${c.runningWorkflows || 0} running · ${c.pendingWorkflows || 0} pending` }),
      h('dt', { text: 'Agents connected' }), h('dd', { text: String(c.connectedAgents || 0) })),
    table(['Controller', 'Role'], rows));
}

function chartCard(r) {
  if (r.status !== 'fulfilled') return fail('Throughput and latency', r);
  const samples = r.value.samples || [];
  const fin = samples.reduce((a, x) => a + Number(x.finished || 0), 0);
  const pick = h('select', {
    id: 'chart-window',
    on: { change: (e) => { windowMs = Number(e.target.value); document.dispatchEvent(new CustomEvent('scabbard:chart-window')); } },
  }, WINDOWS.map(([ms, label]) => h('option', { value: ms, text: label, selected: ms === windowMs })));
  return h('section', { class: 'card wide' }, h('h2', {}, 'Throughput and latency, last ', pick),
    h('p', { class: 'muted', id: 'chart-total', text: `${fin} tasks finished in the window` }),
    statsChart(samples, r.value.bucketMs), legend());
}

function queueCard(cluster, r) {
  if (r.status !== 'fulfilled') return fail('Queue by project', r);
  const rows = (r.value.projects || []).map((p) => h('tr', {}, h('td', { text: p.project || '(default)' }), h('td', { text: String(p.queued || 0) }), h('td', { text: String(p.running || 0) }), h('td', { text: fmtTime(p.oldestQueuedAtMs) })));
  return section('Queue by project', rows.length ? table(['Project', 'Queued', 'Running', 'Oldest queued since'], rows, { id: 'queues' }) : h('p', { class: 'muted', text: 'Nothing queued or running.' }));
}

function agentsCard(r) {
  if (r.status !== 'fulfilled') return fail('Agents', r);
  const rows = (r.value.agents || []).map((a) => h('tr', {}, h('td', {}, h('a', { href: '#/agents', text: a.name || a.id })), h('td', {}, badge(enumName(a.status, 'AGENT_STATUS_'))), h('td', { text: `${a.running || 0}/${a.slots || 0}` })));
  return section('Agents', rows.length ? table(['Agent', 'Status', 'Slots used'], rows) : h('p', { class: 'muted', text: 'No agents registered.' }));
}

function breakersCard(r) {
  if (r.status !== 'fulfilled') return fail('Open breakers', r);
  const rows = (r.value.breakers || []).map((b) => h('tr', {}, h('td', { text: b.key }), h('td', {}, badge(enumName(b.state, 'BREAKER_STATE_'))), h('td', { text: fmtTime(b.retryAtMs) }), h('td', { text: b.lastError || '' })));
  return section('Open breakers', rows.length ? table(['Key', 'State', 'Retry at', 'Last error'], rows) : h('p', { class: 'muted', text: 'All breakers closed.' }));
}
