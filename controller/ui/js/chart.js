// The overview chart, drawn as SVG by hand: tasks finished per bucket as bars, and p50/p95
// submit→finish latency as lines on a second (right) axis.

import { s } from './dom.js';

const W = 720, H = 220, L = 44, R = 56, T = 14, B = 26;

/** A round axis maximum ≥ v that splits into four round steps. */
function nice(v) {
  const step = v / 4;
  const p = 10 ** Math.floor(Math.log10(step));
  const m = [1, 2, 2.5, 5, 10].find((x) => x * p >= step);
  return Math.max(4, m * p * 4);
}

/** An SVG chart of GetStatsResponse.samples. */
export function statsChart(samples, bucketMs) {
  const n = samples.length || 1;
  const pw = W - L - R, ph = H - T - B;
  const bw = pw / n;
  const num = (x) => Number(x || 0);
  const maxCount = nice(Math.max(1, ...samples.map((x) => Math.max(num(x.finished), num(x.submitted)))));
  const maxLat = nice(Math.max(1, ...samples.map((x) => num(x.p95Ms))));
  const y = (v) => T + ph - (v / maxCount) * ph;
  const yl = (v) => T + ph - (v / maxLat) * ph;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': 'Throughput and latency' });
  for (let i = 0; i <= 4; i++) {
    const yy = T + (ph * i) / 4;
    svg.append(s('line', { x1: L, x2: W - R, y1: yy, y2: yy, class: 'grid' }));
    svg.append(s('text', { x: L - 4, y: yy + 4, class: 'axis', 'text-anchor': 'end', text: String(+(maxCount * (1 - i / 4)).toFixed(1)) }));
    svg.append(s('text', { x: W - R + 4, y: yy + 4, class: 'axis', text: `${+(maxLat * (1 - i / 4)).toFixed(1)} ms` }));
  }
  samples.forEach((x, i) => {
    const f = num(x.finished), fl = num(x.failed);
    if (f > 0) {
      svg.append(s('rect', { x: L + i * bw + 0.5, y: y(f), width: Math.max(1, bw - 1), height: T + ph - y(f), class: 'bar-ok' }));
      if (fl > 0) svg.append(s('rect', { x: L + i * bw + 0.5, y: y(fl), width: Math.max(1, bw - 1), height: T + ph - y(fl), class: 'bar-fail' }));
    }
  });
  const line = (key, cls) => {
    const pts = samples.map((x, i) => [L + i * bw + bw / 2, num(x[key])]).filter(([, v]) => v > 0);
    if (pts.length) svg.append(s('polyline', { points: pts.map(([px, v]) => `${px.toFixed(1)},${yl(v).toFixed(1)}`).join(' '), class: cls }));
  };
  line('p50Ms', 'line-p50');
  line('p95Ms', 'line-p95');
  const subs = samples.map((x, i) => [L + i * bw + bw / 2, num(x.submitted)]);
  if (subs.some(([, v]) => v > 0)) svg.append(s('polyline', { points: subs.map(([px, v]) => `${px.toFixed(1)},${y(v).toFixed(1)}`).join(' '), class: 'line-submitted' }));
  const mins = Math.round((n * Number(bucketMs || 5000)) / 60000);
  svg.append(s('text', { x: L, y: H - 8, class: 'axis', text: `−${mins} min` }));
  svg.append(s('text', { x: W - R, y: H - 8, class: 'axis', 'text-anchor': 'end', text: 'now' }));
  return svg;
}

export function legend() {
  const item = (cls, label) => s('g', {}, s('rect', { width: 10, height: 10, class: cls }), s('text', { x: 14, y: 9, class: 'axis', text: label }));
  const svg = s('svg', { viewBox: '0 0 520 14', class: 'legend' });
  [['bar-ok', 'finished / 5 s'], ['bar-fail', 'failed'], ['swatch-submitted', 'submitted'], ['swatch-p50', 'p50 latency'], ['swatch-p95', 'p95 latency']]
    .forEach(([c, l], i) => { const g = item(c, l); g.setAttribute('transform', `translate(${i * 104},0)`); svg.append(g); });
  return svg;
}
