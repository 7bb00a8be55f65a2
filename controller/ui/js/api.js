// The JSON API client: the bearer token from session storage on every call (no cookies),
// errors as ApiError carrying the API's {code, message}, and what the token may do.

const KEY = 'scabbard.token';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const token = () => sessionStorage.getItem(KEY) || '';
export const setToken = (t) => sessionStorage.setItem(KEY, t);
export const logout = () => { sessionStorage.removeItem(KEY); session.who = null; };

/** Who is logged in (WhoAmIResponse.token) once main.js asked. */
export const session = { who: null };

const LEVEL = { SCOPE_READ: 1, SCOPE_SUBMIT: 2, SCOPE_OPERATOR: 3, SCOPE_ADMIN: 4 };
const NEED = { read: 1, submit: 2, operator: 3, admin: 4 };

/** Whether the token's scopes include `scope` (read < submit < operator < admin). */
export function can(scope) {
  const t = session.who;
  if (!t) return false;
  const level = Math.max(0, ...(t.scopes || []).map((x) => LEVEL[x] || 0));
  return level >= NEED[scope];
}

/** Whether the token is bound to no project (cluster-wide actions: drain, global breakers). */
export const clusterWide = () => Boolean(session.who) && (!session.who.project || session.who.project === '*');

export function headers(extra) {
  const h = { ...(extra || {}) };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

export async function errorOf(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const code = (body && body.code) || `HTTP_${resp.status}`;
  const msg = (body && body.message) || resp.statusText || 'request failed';
  return new ApiError(resp.status, code, msg);
}

/** Calls the API; resolves to the JSON answer, rejects with ApiError. */
export async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'UNAVAILABLE', `cannot reach the controller: ${e.message}`);
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401) window.dispatchEvent(new CustomEvent('scabbard:unauthenticated', { detail: err }));
    throw err;
  }
  return resp.json();
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body === undefined ? {} : body);

/** Query string from an object (arrays repeat the key; empty values are left out). */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const x of Array.isArray(v) ? v : [v]) if (x !== undefined && x !== null && x !== '') u.append(k, x);
  }
  const q = u.toString();
  return q ? `?${q}` : '';
}

export const enc = encodeURIComponent;

/** Downloads a file through fetch (the bearer header cannot ride on a plain link). */
export async function download(path, filename) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await errorOf(resp);
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
