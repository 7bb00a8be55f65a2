// DOM helpers. Every string goes in as text (textContent / text nodes / setAttribute),
// never as markup: user data (task names, labels, log lines, errors) cannot inject HTML.

const SVG_NS = 'http://www.w3.org/2000/svg';

function apply(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') el.textContent = String(v);
    else if (k === 'class') el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'dataset') for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = String(dv);
    else if (k === 'value') el.value = v;
    else if (k === 'checked' || k === 'disabled' || k === 'selected') el[k] = Boolean(v);
    else if (k.startsWith('on')) throw new Error('use on: {...} for handlers');
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** An HTML element: h('a', {href, class, text, on: {click}}, ...children). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** "TASK_STATE_RUNNING" → "RUNNING". */
export function enumName(v, prefix) {
  if (v === undefined || v === null || v === '') return '';
  const str = String(v);
  return prefix && str.startsWith(prefix) ? str.slice(prefix.length) : str;
}

export const taskState = (t) => enumName(t && t.state, 'TASK_STATE_') || 'UNSPECIFIED';
export const FINAL_TASK = ['SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT'];

export function fmtTime(ms) {
  const n = Number(ms || 0);
  if (!n) return '—';
  const d = new Date(n);
  const pad = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDur(ms) {
  let n = Math.max(0, Number(ms || 0));
  if (n < 1000) return `${Math.round(n)} ms`;
  n /= 1000;
  if (n < 60) return `${n.toFixed(1)} s`;
  const m = Math.floor(n / 60);
  if (m < 60) return `${m}m ${Math.round(n % 60)}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

export function fmtBytes(b) {
  let n = Number(b || 0);
  for (const u of ['B', 'KiB', 'MiB', 'GiB']) {
    if (n < 1024 || u === 'GiB') return `${u === 'B' ? n : n.toFixed(1)} ${u}`;
    n /= 1024;
  }
  return String(n);
}

/** A state badge: <span class="badge state-running">RUNNING</span>. */
export function badge(state, extra) {
  const st = String(state || 'UNSPECIFIED');
  return h('span', { class: ['badge', `state-${st.toLowerCase().replace(/_/g, '-')}`, extra], text: st });
}

/** An error box showing the API's code and message as text. */
export function errorBox(err) {
  const code = err && err.code ? `${err.code}: ` : '';
  return h('div', { class: 'error', role: 'alert' }, code + (err && err.message ? err.message : String(err)));
}

/** A table from column headers and rows (arrays of nodes/strings). */
export function table(headers, rows, attrs) {
  return h('table', attrs || {},
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', { text: x })))),
    h('tbody', {}, rows));
}

export function labelsText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
}

export function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', { text: title }), children);
}
