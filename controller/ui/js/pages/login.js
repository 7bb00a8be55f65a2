// Login: an API token, checked with whoami and kept in session storage (sent as a bearer
// header; no cookies).

import { setToken, session, logout } from '../api.js';
import { h, errorBox } from '../dom.js';

export const name = 'login';
let loggedIn = () => {};
export function onLoggedIn(fn) { loggedIn = fn; }

export function render(root) {
  const input = h('input', { id: 'token-input', type: 'password', autocomplete: 'off', placeholder: 'scbd_…', required: true, size: 48 });
  const err = h('div', { id: 'login-error' });
  if (session.loginError) { err.append(errorBox(session.loginError)); session.loginError = null; }
  const form = h('form', {
    class: 'card login', id: 'login-form',
    on: {
      submit: async (e) => {
        e.preventDefault();
        const t = input.value.trim();
        if (!t) return;
        logout();
        setToken(t);
        await loggedIn();
      },
    },
  },
  h('h2', { text: 'Log in' }),
  h('p', { class: 'muted', text: 'Paste an API token (scabbard token create, or the one scabbard dev printed). It stays in this tab\'s session storage only.' }),
  h('label', {}, 'API token ', input),
  h('button', { type: 'submit', id: 'login-btn', class: 'primary' }, 'Log in'),
  err);
  root.append(form);
  input.focus();
}
