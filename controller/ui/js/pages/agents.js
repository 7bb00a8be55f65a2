// Agents: capabilities, labels, slots in use, warm cache, breaker state; drain and undrain
// (operator with a cluster-wide token).

import { get, post, can, clusterWide, enc } from '../api.js';
import { h, clear, badge, enumName, labelsText, fmtTime, errorBox, table } from '../dom.js';

export const name = 'agents';

export function render(root) {
  const out = h('div');
  const err = h('div');
  root.append(h('h1', { text: 'Agents' }), err, out);
  let stop = false;
  const act = async (verb, a) => {
    try { await post(`/api/v1/agents/${enc(a.id)}/${verb}`, {}); load(); } catch (e) { clear(err).append(errorBox(e)); }
  };
  const load = async () => {
    const [agents, breakers] = await Promise.allSettled([get('/api/v1/agents'), get('/api/v1/breakers?all=true')]);
    if (stop) return;
    if (agents.status !== 'fulfilled') { clear(out).append(errorBox(agents.reason)); return; }
    const br = new Map(breakers.status === 'fulfilled' ? (breakers.value.breakers || []).map((b) => [b.key, b]) : []);
    const ops = can('operator') && clusterWide();
    const rows = (agents.value.agents || []).map((a) => {
      const b = br.get(`agent:${a.id}`);
      return h('tr', { dataset: { agentId: a.id } },
        h('td', {}, h('strong', { text: a.name || a.id }), h('div', { class: 'mono muted', text: a.id })),
        h('td', {}, badge(enumName(a.status, 'AGENT_STATUS_')), a.draining ? badge('DRAINING') : ''),
        h('td', { text: `${a.running || 0}/${a.slots || 0}` }),
        h('td', { text: (a.capabilities || []).join(', ') }),
        h('td', { text: labelsText(a.labels) }),
        h('td', { text: [...(a.cache?.images || []), ...(a.cache?.cacheVolumes || [])].join(', ') || '—' }),
        h('td', {}, b ? badge(enumName(b.state, 'BREAKER_STATE_')) : badge('CLOSED')),
        h('td', { text: `${a.project || 'all projects'} · v${a.version || '?'} · seen ${fmtTime(a.lastSeenMs)}` }),
        h('td', {}, ops ? (a.draining
          ? h('button', { class: 'undrain-btn', on: { click: () => act('undrain', a) } }, 'Undrain')
          : h('button', { class: 'drain-btn danger', on: { click: () => act('drain', a) } }, 'Drain')) : ''));
    });
    clear(out).append(rows.length
      ? table(['Agent', 'Status', 'Slots used', 'Capabilities', 'Labels', 'Warm cache', 'Breaker', 'Details', ''], rows, { class: 'list', id: 'agents' })
      : h('p', { class: 'muted', text: 'No agents registered.' }));
  };
  load();
  const timer = setInterval(load, 5000);
  return () => { stop = true; clearInterval(timer); };
}
