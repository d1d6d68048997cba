/* Line charts in SVG for the dashboard: no library, nothing fetched. Elements get attributes
   only (no inline style), as the page's Content-Security-Policy requires. */
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const MARGIN = { left: 52, right: 12, top: 10, bottom: 24 };
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  // Upper bound of the y axis: 1, 2, 2.5 or 5 times a power of ten.
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  function clock(seconds, withSeconds) {
    const d = new Date(seconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + (withSeconds ? ":" + pad(d.getSeconds()) : "");
  }

  /* Draw series over time into container (replacing what was there).
     opts: {x: [epoch seconds], series: [{name, color, values, width}], format: y label fn} */
  function lines(container, opts) {
    const width = Math.max(container.clientWidth, 200);
    const height = Math.max(container.clientHeight, 120);
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "data-points": opts.x.length });
    container.replaceChildren(svg);
    const x0 = MARGIN.left, x1 = width - MARGIN.right, y0 = height - MARGIN.bottom, y1 = MARGIN.top;
    el("line", { x1: x0, y1: y0, x2: x1, y2: y0, class: "axis" }, svg);
    if (!opts.x.length) {
      const text = el("text", { x: (x0 + x1) / 2, y: (y0 + y1) / 2, "text-anchor": "middle", class: "empty" }, svg);
      text.textContent = opts.emptyText || "no windows yet";
      return svg;
    }
    let top = 0;
    for (const s of opts.series) for (const v of s.values) if (v > top) top = v;
    top = niceMax(top);
    const first = opts.x[0], last = opts.x[opts.x.length - 1];
    const span = Math.max(last - first, 1);
    const px = (t) => x0 + ((t - first) / span) * (x1 - x0);
    const py = (v) => y0 - (v / top) * (y0 - y1);

    for (let i = 0; i <= 4; i++) {
      const value = (top * i) / 4;
      const y = py(value);
      if (i) el("line", { x1: x0, y1: y, x2: x1, y2: y, class: "axis" }, svg);
      const label = el("text", { x: x0 - 6, y: y + 4, "text-anchor": "end", class: "tick" }, svg);
      label.textContent = opts.format ? opts.format(value) : String(value);
    }
    // Time ticks on round times, at most one per 90 px.
    const room = Math.max(2, Math.floor((x1 - x0) / 90));
    const step = TIME_STEPS.find((s) => span / s <= room) || TIME_STEPS[TIME_STEPS.length - 1];
    for (let t = Math.ceil(first / step) * step; t <= last; t += step) {
      const x = px(t);
      const anchor = x - x0 < 30 ? "start" : x1 - x < 30 ? "end" : "middle";
      const label = el("text", { x, y: height - 6, "text-anchor": anchor, class: "tick" }, svg);
      label.textContent = clock(t, step < 60);
    }
    for (const s of opts.series) {
      if (opts.x.length === 1) {
        el("circle", { cx: px(first), cy: py(s.values[0] || 0), r: 3, fill: s.color, "data-series": s.name }, svg);
        continue;
      }
      const points = s.values.map((v, i) => `${px(opts.x[i]).toFixed(1)},${py(v || 0).toFixed(1)}`);
      el("polyline", {
        points: points.join(" "), fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
        "stroke-linejoin": "round", "data-series": s.name,
      }, svg);
    }
    return svg;
  }

  return { lines, niceMax };
})();
