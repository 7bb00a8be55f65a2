// ANSI SGR colours → spans with classes (ansi-fg-1, ansi-bold, …). Text is only ever set
// through textContent; other escape sequences are dropped.

const CSI = /\x1b\[([0-9;?]*)([@-~])/g;

/** A parser keeping the style across lines and chunks. */
export class Ansi {
  constructor() { this.reset(); }

  reset() { this.fg = null; this.bg = null; this.bold = false; this.dim = false; this.italic = false; this.underline = false; }

  classes() {
    const c = [];
    if (this.fg !== null) c.push(`ansi-fg-${this.fg}`);
    if (this.bg !== null) c.push(`ansi-bg-${this.bg}`);
    if (this.bold) c.push('ansi-bold');
    if (this.dim) c.push('ansi-dim');
    if (this.italic) c.push('ansi-italic');
    if (this.underline) c.push('ansi-underline');
    return c.join(' ');
  }

  sgr(params) {
    const p = params === '' ? [0] : params.split(';').map((x) => Number(x || 0));
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) this.reset();
      else if (n === 1) this.bold = true;
      else if (n === 2) this.dim = true;
      else if (n === 3) this.italic = true;
      else if (n === 4) this.underline = true;
      else if (n === 22) { this.bold = false; this.dim = false; }
      else if (n === 23) this.italic = false;
      else if (n === 24) this.underline = false;
      else if (n >= 30 && n <= 37) this.fg = n - 30;
      else if (n >= 90 && n <= 97) this.fg = n - 90 + 8;
      else if (n === 39) this.fg = null;
      else if (n >= 40 && n <= 47) this.bg = n - 40;
      else if (n >= 100 && n <= 107) this.bg = n - 100 + 8;
      else if (n === 49) this.bg = null;
      else if ((n === 38 || n === 48) && p[i + 1] === 5) {
        const c = p[i + 2] || 0;
        const v = c < 16 ? c : nearest16(c);
        if (n === 38) this.fg = v; else this.bg = v;
        i += 2;
      } else if ((n === 38 || n === 48) && p[i + 1] === 2) {
        i += 4; // truecolour: not mapped
      }
    }
  }

  /** Splits one line into [{text, cls}] segments. */
  segments(line) {
    const out = [];
    let last = 0;
    CSI.lastIndex = 0;
    let m;
    while ((m = CSI.exec(line))) {
      if (m.index > last) out.push({ text: line.slice(last, m.index), cls: this.classes() });
      if (m[2] === 'm') this.sgr(m[1]);
      last = CSI.lastIndex;
    }
    if (last < line.length) out.push({ text: line.slice(last), cls: this.classes() });
    // Other control characters (a lone ESC, carriage returns) are not shown.
    return out.map((x) => ({ text: x.text.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, ''), cls: x.cls })).filter((x) => x.text);
  }

  /** One line as a DOM fragment of spans. */
  render(line) {
    const frag = document.createDocumentFragment();
    for (const seg of this.segments(line)) {
      const span = document.createElement('span');
      if (seg.cls) span.className = seg.cls;
      span.textContent = seg.text;
      frag.append(span);
    }
    return frag;
  }
}

function nearest16(c) {
  if (c >= 232) return c < 244 ? 8 : 7;
  const i = c - 16;
  const r = Math.floor(i / 36), g = Math.floor((i % 36) / 6), b = i % 6;
  const bright = Math.max(r, g, b) > 3 ? 8 : 0;
  return bright + ((r > 2 ? 1 : 0) | (g > 2 ? 2 : 0) | (b > 2 ? 4 : 0));
}
