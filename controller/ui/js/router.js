// Hash routing: "#/tasks/<id>" → the tasks page's detail view. A page module exports
// render(root, params) and may return a cleanup function (closing its streams and timers),
// called when the user navigates away.

const routes = [];
let cleanup = null;

/** Registers `pattern` ("/tasks/:id") → page. */
export function route(pattern, page) {
  const names = [];
  const re = new RegExp('^' + pattern.replace(/:(\w+)/g, (_, n) => { names.push(n); return '([^/]+)'; }) + '$');
  routes.push({ re, names, page });
}

export function current() {
  return (location.hash.replace(/^#/, '') || '/').split('?')[0];
}

/** Query parameters of the hash ("#/tasks?state=RUNNING"). */
export function hashQuery() {
  const q = location.hash.split('?')[1] || '';
  return new URLSearchParams(q);
}

export function go(path) {
  if (location.hash === `#${path}`) dispatch();
  else location.hash = path;
}

/** Renders the page of the current hash into `root`. */
export async function dispatch(root = document.getElementById('app')) {
  if (cleanup) { try { cleanup(); } catch (_) { /* ignore */ } cleanup = null; }
  const path = current();
  for (const r of routes) {
    const m = path.match(r.re);
    if (!m) continue;
    const params = {};
    r.names.forEach((n, i) => { params[n] = decodeURIComponent(m[i + 1]); });
    while (root.firstChild) root.removeChild(root.firstChild);
    document.body.dataset.page = r.page.name || '';
    const out = await r.page.render(root, params);
    if (typeof out === 'function') cleanup = out;
    document.dispatchEvent(new CustomEvent('scabbard:rendered', { detail: path }));
    return;
  }
  while (root.firstChild) root.removeChild(root.firstChild);
  const p = document.createElement('p');
  p.className = 'error';
  p.textContent = `No page ${path}`;
  root.append(p);
}
