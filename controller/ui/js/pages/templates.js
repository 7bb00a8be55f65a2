// Templates: the list, and per template a form generated from its typed parameters (enums
// as selects, ints with min/max, patterns, defaults, required). Each change asks the
// server to render (dry run): its validation message is shown as returned, else the
// rendered workflow as YAML. Run (submit scope) starts it and opens the workflow.

import { get, post, can, enc } from '../api.js';
import { h, clear, enumName, errorBox, table } from '../dom.js';
import { go } from '../router.js';

export const name = 'templates';

export function render(root, { name: tname }) {
  if (tname) return detail(root, tname);
  const out = h('div');
  root.append(h('h1', { text: 'Templates' }), out);
  get('/api/v1/templates').then((r) => {
    const rows = (r.templates || []).map((t) => h('tr', {},
      h('td', {}, h('a', { href: `#/templates/${enc(t.name)}`, class: 'template-link', text: t.name })),
      h('td', { text: `v${t.version || ''}` }),
      h('td', { text: (t.params || []).map((p) => p.name).join(', ') }),
      h('td', { text: t.description || '' })));
    out.append(rows.length ? table(['Name', 'Version', 'Parameters', 'Description'], rows, { class: 'list' }) : h('p', { class: 'muted', text: 'No templates loaded.' }));
  }).catch((e) => out.append(errorBox(e)));
  return undefined;
}

function field(p) {
  const type = enumName(p.type, 'PARAM_TYPE_');
  const id = `param-${p.name}`;
  let input;
  if (type === 'ENUM') {
    input = h('select', { id, name: p.name }, p.required && !p.hasDefault ? h('option', { value: '', text: '—' }) : '',
      (p.values || []).map((v) => h('option', { value: v, text: v, selected: p.hasDefault && v === p.default })));
  } else if (type === 'BOOL') {
    input = h('input', { id, name: p.name, type: 'checkbox', checked: p.hasDefault && p.default === 'true' });
  } else {
    input = h('input', {
      id, name: p.name, type: type === 'INT' ? 'number' : 'text',
      value: p.hasDefault ? p.default : '',
      min: p.min !== undefined ? String(p.min) : undefined, max: p.max !== undefined ? String(p.max) : undefined,
      pattern: p.pattern || undefined, required: Boolean(p.required),
      placeholder: type === 'LIST' ? 'comma-separated' : '',
    });
  }
  const hints = [type.toLowerCase(), p.required ? 'required' : 'optional',
    p.min !== undefined ? `min ${p.min}` : '', p.max !== undefined ? `max ${p.max}` : '', p.pattern ? `pattern ${p.pattern}` : ''].filter(Boolean).join(' · ');
  return h('div', { class: 'field' }, h('label', { for: id, text: p.name }), input, h('small', { class: 'muted', text: `${hints}${p.description ? ` — ${p.description}` : ''}` }));
}

function detail(root, tname) {
  const err = h('div');
  root.append(h('h1', {}, 'Template ', h('span', { text: tname })), err);
  get(`/api/v1/templates/${enc(tname)}`).then((t) => {
    const params = t.params || [];
    const formErr = h('div', { id: 'form-error' });
    const preview = h('pre', { class: 'yaml', id: 'render-preview' });
    const project = h('input', { id: 'run-project', placeholder: 'project (optional)' });
    const values = (form) => {
      const out = {};
      for (const p of params) {
        const el = form.elements[p.name];
        if (!el) continue;
        if (el.type === 'checkbox') out[p.name] = el.checked ? 'true' : 'false';
        else if (el.value !== '') out[p.name] = el.value;
      }
      return out;
    };
    const renderPreview = async () => {
      try {
        const r = await post(`/api/v1/templates/${enc(tname)}/render`, { params: values(form) });
        clear(formErr);
        preview.textContent = toYaml(prune(r.workflow || {}) || {});
        return true;
      } catch (e) {
        clear(formErr).append(errorBox(e));
        preview.textContent = '';
        return false;
      }
    };
    const run = async () => {
      try {
        const body = { params: values(form) };
        if (project.value.trim()) body.project = project.value.trim();
        const r = await post(`/api/v1/templates/${enc(tname)}/run`, body);
        go(`/workflows/${r.workflow.id}`);
      } catch (e) { clear(formErr).append(errorBox(e)); }
    };
    let timer = null;
    const form = h('form', {
      id: 'template-form', novalidate: true, class: 'card',
      on: {
        input: () => { clearTimeout(timer); timer = setTimeout(renderPreview, 300); },
        submit: (e) => { e.preventDefault(); run(); },
      },
    },
    h('h2', { text: `${t.name} v${t.version || ''}` }),
    t.description ? h('p', { class: 'muted', text: t.description }) : '',
    params.map(field),
    can('submit') ? h('div', { class: 'field' }, h('label', { for: 'run-project', text: 'project' }), project) : '',
    h('div', { class: 'actions' },
      h('button', { type: 'button', id: 'render-btn', on: { click: renderPreview } }, 'Preview (dry run)'),
      can('submit') ? h('button', { type: 'submit', id: 'run-btn', class: 'primary' }, 'Run') : ''),
    formErr);
    root.append(h('div', { class: 'grid' }, form, h('section', { class: 'card' }, h('h2', { text: 'Rendered workflow' }), preview)));
    renderPreview();
  }).catch((e) => err.append(errorBox(e)));
  return undefined;
}

/** Drops what the JSON mapping fills in by default ("", 0, false, [], {}, *_UNSPECIFIED). */
export function prune(v) {
  if (Array.isArray(v)) { const a = v.map((x) => (x !== null && typeof x === 'object' ? prune(x) ?? {} : x)); return a.length ? a : undefined; }
  if (v !== null && typeof v === 'object') {
    const o = {};
    for (const [k, x] of Object.entries(v)) { const p = prune(x); if (p !== undefined) o[k] = p; }
    return Object.keys(o).length ? o : undefined;
  }
  if (v === '' || v === 0 || v === '0' || v === false || v === null || (typeof v === 'string' && v.endsWith('_UNSPECIFIED'))) return undefined;
  return v;
}

/** A small YAML writer for the rendered WorkflowSpec (JSON data: objects, arrays, scalars). */
export function toYaml(v, indent = '') {
  const scalar = (x) => {
    if (typeof x === 'string') return /^[\w./@-][\w ./@:=-]*$/.test(x) && !/^(true|false|null|yes|no|[\d.]+)$/i.test(x) ? x : JSON.stringify(x);
    return JSON.stringify(x);
  };
  if (Array.isArray(v)) {
    if (!v.length) return '[]';
    return v.map((x) => (x !== null && typeof x === 'object' && !Array.isArray(x) && Object.keys(x).length
      ? `${indent}- ${toYaml(x, `${indent}  `).trimStart()}`
      : `${indent}- ${typeof x === 'object' && x !== null ? toYaml(x, `${indent}  `) : scalar(x)}`)).join('\n');
  }
  if (v !== null && typeof v === 'object') {
    const keys = Object.keys(v);
    if (!keys.length) return '{}';
    return keys.map((k) => {
      const x = v[k];
      if (x !== null && typeof x === 'object' && (Array.isArray(x) ? x.length : Object.keys(x).length)) {
        return `${indent}${k}:\n${toYaml(x, `${indent}  `)}`;
      }
      return `${indent}${k}: ${typeof x === 'object' && x !== null ? toYaml(x, indent) : scalar(x)}`;
    }).join('\n');
  }
  return indent + scalar(v);
}
