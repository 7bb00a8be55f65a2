// Configuration: the controller's effective configuration (GET /api/v1/config, secrets
// hidden by the server), projects with quota, rate and retention (editable by admins),
// tokens (create shows the secret once; revoke), breakers (reset) and the audit log.

import { get, post, api, can, enc, qs } from '../api.js';
import { h, clear, badge, enumName, fmtTime, errorBox, section, table } from '../dom.js';

export const name = 'config';

export function render(root) {
  root.append(h('h1', { text: 'Configuration' }));
  const cards = { config: h('div'), projects: h('div'), tokens: h('div'), breakers: h('div'), audit: h('div') };
  root.append(section('Effective controller configuration', cards.config), section('Projects', cards.projects),
    section('Tokens', cards.tokens), section('Circuit breakers', cards.breakers), section('Audit log', cards.audit));
  loadConfig(cards.config);
  loadProjects(cards.projects);
  loadTokens(cards.tokens);
  loadBreakers(cards.breakers);
  loadAudit(cards.audit);
}

async function loadConfig(box) {
  try {
    const r = await get('/api/v1/config');
    clear(box).append(h('pre', { class: 'yaml', id: 'config-json', text: JSON.stringify(r, null, 2) }));
  } catch (e) { clear(box).append(errorBox(e)); }
}

async function loadProjects(box) {
  try {
    const r = await get('/api/v1/projects');
    const admin = can('admin');
    const rows = (r.projects || []).map((p) => {
      const q = p.quota || {};
      const num = (k, v) => h('input', { type: 'number', min: 0, name: k, value: String(v || 0), disabled: !admin, class: 'narrow' });
      const inputs = { maxQueuedTasks: num('maxQueuedTasks', q.maxQueuedTasks), maxRunningTasks: num('maxRunningTasks', q.maxRunningTasks), requestsPerSecond: num('requestsPerSecond', q.requestsPerSecond), burst: num('burst', q.burst) };
      const retention = h('input', { type: 'number', min: 0, step: 'any', value: String(p.retentionDays || 0), disabled: !admin, class: 'narrow' });
      const desc = h('input', { value: p.description || '', disabled: !admin });
      const msg = h('span');
      const save = async () => {
        const quota = {};
        for (const [k, el] of Object.entries(inputs)) quota[k] = Number(el.value || 0);
        try {
          await api('PATCH', `/api/v1/projects/${enc(p.name)}`, { project: { description: desc.value, quota, retentionDays: Number(retention.value || 0) } });
          clear(msg).append(h('span', { class: 'ok', text: 'saved' }));
        } catch (e) { clear(msg).append(errorBox(e)); }
      };
      return h('tr', { dataset: { project: p.name } }, h('td', { text: p.name }), h('td', {}, desc),
        h('td', {}, inputs.maxQueuedTasks), h('td', {}, inputs.maxRunningTasks), h('td', {}, inputs.requestsPerSecond), h('td', {}, inputs.burst), h('td', {}, retention),
        h('td', {}, admin ? h('button', { class: 'save-project', on: { click: save } }, 'Save') : '', msg));
    });
    clear(box).append(rows.length ? table(['Name', 'Description', 'Max queued', 'Max running', 'Req/s', 'Burst', 'Retention (days)', ''], rows, { class: 'list' }) : h('p', { class: 'muted', text: 'No projects.' }),
      h('p', { class: 'muted', text: '0 = no limit / controller default.' }));
  } catch (e) { clear(box).append(errorBox(e)); }
}

async function loadTokens(box) {
  const admin = can('admin');
  const secret = h('div', { id: 'token-secret' });
  let list = null;
  try { list = await get('/api/v1/tokens?includeRevoked=true'); } catch (e) { clear(box).append(errorBox(e)); if (!admin) return; }
  const rows = ((list && list.tokens) || []).map((t) => h('tr', { dataset: { tokenId: t.id } },
    h('td', { class: 'mono', text: t.id }), h('td', { text: t.name || '' }), h('td', { text: enumName(t.kind, 'TOKEN_KIND_') }),
    h('td', { text: (t.scopes || []).map((x) => enumName(x, 'SCOPE_').toLowerCase()).join(', ') }),
    h('td', { text: t.project || 'all' }), h('td', { text: fmtTime(t.createdAtMs) }), h('td', { text: t.expiresAtMs && t.expiresAtMs !== '0' ? fmtTime(t.expiresAtMs) : 'never' }),
    h('td', {}, t.revoked ? badge('REVOKED') : (admin ? h('button', { class: 'revoke-btn danger', on: { click: () => revoke(t) } }, 'Revoke') : ''))));
  const revoke = async (t) => {
    try { await post(`/api/v1/tokens/${enc(t.id)}/revoke`, {}); loadTokens(box); } catch (e) { box.append(errorBox(e)); }
  };
  const parts = [];
  if (list) parts.push(rows.length ? table(['ID', 'Name', 'Kind', 'Scopes', 'Project', 'Created', 'Expires', ''], rows, { class: 'list', id: 'tokens' }) : h('p', { class: 'muted', text: 'No tokens.' }));
  if (admin) {
    const nameIn = h('input', { name: 'name', placeholder: 'name', required: true });
    const scope = h('select', { name: 'scope' }, ['read', 'submit', 'operator', 'admin'].map((x) => h('option', { value: `SCOPE_${x.toUpperCase()}`, text: x })));
    const project = h('input', { name: 'project', placeholder: 'project (empty = all)' });
    const kind = h('select', { name: 'kind' }, h('option', { value: 'TOKEN_KIND_API', text: 'API token' }), h('option', { value: 'TOKEN_KIND_REGISTRATION', text: 'worker registration' }));
    const form = h('form', {
      class: 'inline', id: 'create-token-form',
      on: {
        submit: async (e) => {
          e.preventDefault();
          try {
            const body = { kind: kind.value, name: nameIn.value.trim(), project: project.value.trim() };
            if (kind.value === 'TOKEN_KIND_API') body.scopes = [scope.value];
            const r = await post('/api/v1/tokens', body);
            await loadTokens(box);
            const s = box.querySelector('#token-secret');
            clear(s).append(h('div', { class: 'secret' }, h('strong', { text: 'Copy this secret now; it is not shown again: ' }), h('code', { id: 'new-secret', text: r.secret })));
          } catch (x) { clear(secret).append(errorBox(x)); }
        },
      },
    }, kind, nameIn, scope, project, h('button', { type: 'submit', id: 'create-token-btn', class: 'primary' }, 'Create token'));
    parts.push(h('h3', { text: 'New token' }), form);
  }
  parts.push(secret);
  clear(box).append(...parts);
}

async function loadBreakers(box) {
  try {
    const r = await get('/api/v1/breakers?all=true');
    const rows = (r.breakers || []).map((b) => h('tr', {}, h('td', { class: 'mono', text: b.key }), h('td', {}, badge(enumName(b.state, 'BREAKER_STATE_'))),
      h('td', { text: String(b.failures || 0) }), h('td', { text: String(b.trips || 0) }), h('td', { text: b.lastError || '' }),
      h('td', {}, can('operator') && enumName(b.state, 'BREAKER_STATE_') !== 'CLOSED'
        ? h('button', { class: 'reset-btn', on: { click: async () => { try { await post(`/api/v1/breakers/${enc(b.key)}/reset`, {}); loadBreakers(box); } catch (e) { box.append(errorBox(e)); } } } }, 'Reset') : '')));
    clear(box).append(rows.length ? table(['Key', 'State', 'Failures', 'Trips', 'Last error', ''], rows, { class: 'list' }) : h('p', { class: 'muted', text: 'No breakers have counted failures.' }));
  } catch (e) { clear(box).append(errorBox(e)); }
}

async function loadAudit(box) {
  try {
    const r = await get(`/api/v1/audit${qs({ limit: 50 })}`);
    const rows = (r.entries || []).map((a) => h('tr', {}, h('td', { text: fmtTime(a.atMs) }), h('td', { text: a.actorName || a.actor }), h('td', { class: 'mono', text: a.action }),
      h('td', { class: 'mono', text: a.target || '' }), h('td', { text: a.project || '' }), h('td', { text: a.detail || '' }), h('td', { class: 'mono', text: a.peer || '' })));
    clear(box).append(rows.length ? table(['When', 'Actor', 'Action', 'Target', 'Project', 'Detail', 'Peer'], rows, { class: 'list', id: 'audit' }) : h('p', { class: 'muted', text: 'No entries.' }));
  } catch (e) { clear(box).append(errorBox(e)); }
}
