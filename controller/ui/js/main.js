// Entry point: asks whoami with the stored token (or shows the login page), draws the
// navigation for what the token's scopes allow, and routes.

import { get, session, token, logout, can } from './api.js';
import { h, clear } from './dom.js';
import { route, dispatch, go, current } from './router.js';
import * as login from './pages/login.js';
import * as overview from './pages/overview.js';
import * as tasks from './pages/tasks.js';
import * as task from './pages/task.js';
import * as workflows from './pages/workflows.js';
import * as workflow from './pages/workflow.js';
import * as agents from './pages/agents.js';
import * as templates from './pages/templates.js';
import * as schedules from './pages/schedules.js';
import * as config from './pages/config.js';

route('/login', login);
route('/', overview);
route('/tasks', tasks);
route('/tasks/:id', task);
route('/workflows', workflows);
route('/workflows/:id', workflow);
route('/agents', agents);
route('/templates', templates);
route('/templates/:name', templates);
route('/schedules', schedules);
route('/config', config);

const NAV = [
  ['/', 'Overview', 'overview'],
  ['/tasks', 'Tasks', 'tasks'],
  ['/workflows', 'Workflows', 'workflows'],
  ['/agents', 'Agents', 'agents'],
  ['/templates', 'Templates', 'templates'],
  ['/schedules', 'Schedules', 'schedules'],
  ['/config', 'Configuration', 'config'],
];

function drawChrome() {
  const nav = clear(document.getElementById('nav'));
  const who = clear(document.getElementById('who'));
  if (!session.who) return;
  const here = current();
  for (const [path, label, key] of NAV) {
    const active = path === '/' ? here === '/' : here.startsWith(path);
    nav.append(h('a', { href: `#${path}`, class: active ? 'active' : '', dataset: { nav: key } }, label));
  }
  const t = session.who;
  const scope = ['admin', 'operator', 'submit', 'read'].find((x) => can(x)) || 'none';
  who.append(
    h('span', { class: 'who-name', id: 'who-name', text: t.name || t.id }),
    h('span', { class: 'badge scope', id: 'who-scope', text: scope }),
    h('span', { class: 'badge', id: 'who-project', text: !t.project || t.project === '*' ? 'all projects' : `project ${t.project}` }),
    h('button', { class: 'link', id: 'logout-btn', on: { click: () => { logout(); drawChrome(); go('/login'); } } }, 'Log out'),
  );
}

/** Learns who the token is; false without a usable token. */
export async function whoami() {
  if (!token()) return false;
  try {
    const r = await get('/api/v1/whoami');
    session.who = r.token || {};
    return true;
  } catch (e) {
    session.who = null;
    session.loginError = e;
    if (e.status === 401) logout();
    return false;
  }
}

async function onRoute() {
  if (!session.who && current() !== '/login') {
    if (!(await whoami())) { drawChrome(); go('/login'); return; }
  }
  drawChrome();
  await dispatch();
}

window.addEventListener('scabbard:unauthenticated', () => {
  logout();
  drawChrome();
  go('/login');
});
window.addEventListener('hashchange', onRoute);
login.onLoggedIn(async () => {
  if (await whoami()) go('/');
  else dispatch();
});
onRoute();
