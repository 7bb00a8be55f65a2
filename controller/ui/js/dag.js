// The workflow graph: a layered layout computed here (layer = longest path from a root,
// order within a layer by the parents' mean position), drawn as SVG, left to right. Each
// node is a link to its task, coloured by state (classes state-*), failed nodes show
// their exit code. update() recolours in place as workflow events arrive.

import { s, enumName } from './dom.js';

const NW = 170, NH = 48, GX = 70, GY = 22, PAD = 16;

export function layout(nodes) {
  const by = new Map(nodes.map((n) => [n.name, n]));
  const layer = new Map();
  const depth = (name, seen = new Set()) => {
    if (layer.has(name)) return layer.get(name);
    if (seen.has(name)) return 0;
    seen.add(name);
    const deps = (by.get(name)?.dependsOn || []).filter((d) => by.has(d));
    const l = deps.length ? 1 + Math.max(...deps.map((d) => depth(d, seen))) : 0;
    layer.set(name, l);
    return l;
  };
  nodes.forEach((n) => depth(n.name));
  const layers = [];
  for (const n of nodes) (layers[layer.get(n.name)] ||= []).push(n.name);
  const pos = new Map();
  layers.forEach((names, li) => {
    if (li > 0) {
      const mean = (nm) => {
        const ps = (by.get(nm).dependsOn || []).filter((d) => pos.has(d)).map((d) => pos.get(d).row);
        return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : 0;
      };
      names.sort((a, b) => mean(a) - mean(b));
    }
    names.forEach((nm, row) => pos.set(nm, { layer: li, row, x: PAD + li * (NW + GX), y: PAD + row * (NH + GY) }));
  });
  const rows = Math.max(1, ...layers.map((l) => l.length));
  return { pos, width: PAD * 2 + layers.length * NW + (layers.length - 1) * GX, height: PAD * 2 + rows * NH + (rows - 1) * GY };
}

function label(n) {
  const st = enumName(n.state, 'NODE_STATE_') || 'UNSPECIFIED';
  if (st === 'FAILED') return `FAILED · exit ${Number(n.exitCode || 0)}`;
  return n.attempts > 1 ? `${st} · attempt ${n.attempts}` : st;
}

/** Draws the graph; returns {svg, update(workflow)}. */
export function drawDag(workflow) {
  const nodes = workflow.nodes || [];
  const { pos, width, height } = layout(nodes);
  const vw = Math.max(width, 200), vh = Math.max(height, 80);
  const svg = s('svg', { viewBox: `0 0 ${vw} ${vh}`, width: vw, height: vh, class: 'dag', id: 'dag' });
  const defs = s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow' })));
  svg.append(defs);
  for (const n of nodes) {
    const to = pos.get(n.name);
    for (const d of n.dependsOn || []) {
      const from = pos.get(d);
      if (!from) continue;
      const x1 = from.x + NW, y1 = from.y + NH / 2, x2 = to.x, y2 = to.y + NH / 2, mx = (x1 + x2) / 2;
      svg.append(s('path', { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, class: 'edge', 'marker-end': 'url(#arrow)' }));
    }
  }
  const els = new Map();
  for (const n of nodes) {
    const p = pos.get(n.name);
    const rect = s('rect', { x: p.x, y: p.y, width: NW, height: NH, rx: 6 });
    const title = s('text', { x: p.x + 10, y: p.y + 19, class: 'node-name', text: n.name });
    const sub = s('text', { x: p.x + 10, y: p.y + 37, class: 'node-state' });
    const g = s('g', { class: 'node', dataset: { node: n.name } }, s('title', { text: n.name }), rect, title, sub);
    const a = s('a', { class: 'node-link' }, g);
    svg.append(a);
    els.set(n.name, { g, a, sub });
  }
  const update = (wf) => {
    for (const n of wf.nodes || []) {
      const e = els.get(n.name);
      if (!e) continue;
      const st = enumName(n.state, 'NODE_STATE_') || 'UNSPECIFIED';
      e.g.setAttribute('class', `node state-${st.toLowerCase()}`);
      e.g.dataset.state = st;
      e.g.dataset.exitCode = String(Number(n.exitCode || 0));
      e.sub.textContent = label(n);
      if (n.taskId) e.a.setAttribute('href', `#/tasks/${encodeURIComponent(n.taskId)}`);
    }
  };
  update(workflow);
  return { svg, update };
}
