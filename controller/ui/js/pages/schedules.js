// Schedules: cron, template, next fire times, last outcome; pause and resume (submit scope).

import { get, post, can, enc } from '../api.js';
import { h, clear, badge, fmtTime, errorBox, table } from '../dom.js';

export const name = 'schedules';

export function render(root) {
  const out = h('div');
  const err = h('div');
  root.append(h('h1', { text: 'Schedules' }), err, out);
  const act = async (verb, sch) => {
    try { await post(`/api/v1/schedules/${enc(sch.id)}/${verb}`, {}); load(); } catch (e) { clear(err).append(errorBox(e)); }
  };
  const load = async () => {
    try {
      const r = await get('/api/v1/schedules');
      const rows = (r.schedules || []).map((x) => h('tr', { dataset: { scheduleId: x.id } },
        h('td', { text: x.spec?.name || x.id }),
        h('td', { class: 'mono', text: `${x.spec?.cron || ''} ${x.spec?.timezone || ''}` }),
        h('td', { text: x.spec?.template || '' }),
        h('td', { text: x.project || '' }),
        h('td', {}, x.paused ? badge('PAUSED') : badge('ACTIVE')),
        h('td', { class: 'next-fire', text: x.paused ? '—' : fmtTime(x.nextTickMs) }),
        h('td', {}, x.lastWorkflowId ? h('a', { href: `#/workflows/${enc(x.lastWorkflowId)}`, text: x.lastOutcome || x.lastWorkflowId }) : (x.lastOutcome || '')),
        h('td', { text: `${x.fired || 0} fired · ${x.skipped || 0} skipped` }),
        h('td', {}, can('submit') ? h('button', { class: x.paused ? 'resume-btn' : 'pause-btn', on: { click: () => act(x.paused ? 'resume' : 'pause', x) } }, x.paused ? 'Resume' : 'Pause') : '')));
      clear(out).append(rows.length ? table(['Name', 'Cron', 'Template', 'Project', 'State', 'Next fire', 'Last', 'Counts', ''], rows, { class: 'list' }) : h('p', { class: 'muted', text: 'No schedules.' }));
    } catch (e) { clear(out).append(errorBox(e)); }
  };
  load();
  const timer = setInterval(load, 10000);
  return () => clearInterval(timer);
}
