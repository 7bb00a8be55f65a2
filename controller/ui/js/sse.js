// Server-sent events over fetch (EventSource cannot send the Authorization header): parses
// the stream, calls onEvent({event, data, id}) and, when asked, reconnects after a drop
// with Last-Event-ID so no event is missed.

import { headers, errorOf } from './api.js';

/**
 * Opens `path`. opts: onEvent(ev), onError(err), onEnd(), reconnect (bool), lastEventId.
 * Returns {close()}.
 */
export function stream(path, opts) {
  const ctl = { closed: false, abort: null, lastId: opts.lastEventId || '' };
  let delay = 500;
  const run = async () => {
    while (!ctl.closed) {
      const ac = new AbortController();
      ctl.abort = ac;
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (ctl.lastId) h['Last-Event-ID'] = ctl.lastId;
        const resp = await fetch(path, { headers: h, signal: ac.signal });
        if (!resp.ok) {
          const err = await errorOf(resp);
          if (opts.onError) opts.onError(err);
          // A refused resume point: start afresh rather than loop on it.
          if (resp.status === 400 && ctl.lastId) { ctl.lastId = ''; continue; }
          return;
        }
        delay = 500;
        await read(resp.body, (ev) => {
          if (ev.id) ctl.lastId = ev.id;
          if (ev.event === 'error') {
            let e = { message: ev.data };
            try { e = JSON.parse(ev.data); } catch (_) { /* text */ }
            if (opts.onError) opts.onError(e);
            return;
          }
          opts.onEvent(ev);
        });
        if (!opts.reconnect) { if (opts.onEnd) opts.onEnd(); return; }
      } catch (e) {
        if (ctl.closed) return;
        if (!opts.reconnect) { if (opts.onError) opts.onError({ code: 'UNAVAILABLE', message: String(e.message || e) }); return; }
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  };
  run();
  return {
    close() {
      ctl.closed = true;
      if (ctl.abort) ctl.abort.abort();
    },
  };
}

async function read(body, emit) {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  let ev = { event: 'message', data: [], id: '' };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let nl;
    while ((nl = buf.search(/\r?\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(buf[nl] === '\r' ? nl + 2 : nl + 1);
      if (line === '') {
        if (ev.data.length) emit({ event: ev.event, data: ev.data.join('\n'), id: ev.id });
        ev = { event: 'message', data: [], id: '' };
        continue;
      }
      if (line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let val = i < 0 ? '' : line.slice(i + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'event') ev.event = val;
      else if (field === 'data') ev.data.push(val);
      else if (field === 'id') ev.id = val;
    }
  }
}
