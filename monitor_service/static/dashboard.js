// slmcl live dashboard: polls the monitor's JSON every 2 s and draws the figures as inline SVG.
// No framework, no build, nothing from the network: the numbers come from slmcl.report.live (the report's code).
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
let selected = null;      // the experiment shown below the list
let detailTag = null;     // ETag of the figures drawn (a 304 keeps them)
let experiments = [];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits === undefined ? 3 : digits);
}

// ------------------------------------------------------------------ charts

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

// series: [{label, colour, dashed, lines (bool), points: [{x, y, err?}]}]
function chart(opts) {
  const W = opts.width || 560, H = opts.height || 300, M = {l: 56, r: 12, t: 24, b: 40};
  const s = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "class": "chart"});
  s.appendChild(svgEl("title", {}, opts.title));
  const pts = opts.series.flatMap(se => se.points.filter(p => p.y !== null && p.x !== null));
  s.appendChild(svgEl("text", {x: M.l, y: 15, "font-weight": "600"}, opts.title));
  if (!pts.length) {
    s.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty"}, "no data yet"));
    return s;
  }
  let [x0, x1] = opts.xrange || [Math.min(...pts.map(p => p.x)), Math.max(...pts.map(p => p.x))];
  let y0 = Math.min(...pts.map(p => p.y - (p.err || 0))), y1 = Math.max(...pts.map(p => p.y + (p.err || 0)));
  if (opts.yrange) { y0 = Math.min(y0, opts.yrange[0]); y1 = Math.max(y1, opts.yrange[1]); }
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = x => M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r);
  const Y = y => H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b);
  const xt = opts.integerX ? niceTicks(x0, x1, Math.min(10, x1 - x0)).filter(Number.isInteger) : niceTicks(x0, x1, 6);
  for (const t of xt) {
    s.appendChild(svgEl("line", {x1: X(t), x2: X(t), y1: M.t, y2: H - M.b, "class": "grid"}));
    s.appendChild(svgEl("text", {x: X(t), y: H - M.b + 14, "text-anchor": "middle"}, String(t)));
  }
  for (const t of niceTicks(y0, y1, 5)) {
    s.appendChild(svgEl("line", {x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), "class": "grid"}));
    s.appendChild(svgEl("text", {x: M.l - 4, y: Y(t) + 4, "text-anchor": "end"}, String(t)));
  }
  s.appendChild(svgEl("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, "class": "axis"}));
  s.appendChild(svgEl("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, "class": "axis"}));
  s.appendChild(svgEl("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, opts.xlabel));
  s.appendChild(svgEl("text", {x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                               transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})`}, opts.ylabel));
  let ly = M.t + 4;
  for (const se of opts.series) {
    const known = se.points.filter(p => p.y !== null && p.x !== null);
    if (se.lines && known.length > 1) {
      s.appendChild(svgEl("polyline", {points: known.map(p => `${X(p.x)},${Y(p.y)}`).join(" "), fill: "none",
                                       stroke: se.colour, "stroke-width": 1.8,
                                       "stroke-dasharray": se.dashed ? "6 4" : "none"}));
    }
    for (const p of known) {
      if (p.err) {
        s.appendChild(svgEl("line", {x1: X(p.x), x2: X(p.x), y1: Y(p.y - p.err), y2: Y(p.y + p.err),
                                     stroke: se.colour}));
      }
      const dot = svgEl("circle", {cx: X(p.x), cy: Y(p.y), r: p.big ? 6 : 3.5, stroke: se.colour,
                                   fill: se.hollow ? "#fff" : se.colour, "class": "pt"});
      dot.appendChild(svgEl("title", {}, `${se.label}: ${p.tip || ""} (${fmt(p.x)}, ${fmt(p.y)})`));
      s.appendChild(dot);
    }
    if (se.label) {
      s.appendChild(svgEl("line", {x1: W - M.r - 150, x2: W - M.r - 130, y1: ly, y2: ly, stroke: se.colour,
                                   "stroke-width": 2, "stroke-dasharray": se.dashed ? "5 3" : "none"}));
      s.appendChild(svgEl("text", {x: W - M.r - 126, y: ly + 4}, se.label.slice(0, 26)));
      ly += 14;
    }
  }
  return s;
}

function viridisish(v) {  // 0 → dark purple, 1 → yellow (a few stops of viridis, interpolated)
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.max(0, Math.min(1, v)) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i, c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function heatmap(m) {
  const cell = 58, left = 110, top = 36, W = left + cell * m.tasks.length + 12, H = top + cell * m.rows.length + 52;
  const s = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "class": "matrix"});
  const title = `${m.strategy} · ${m.order_text} · seed ${m.seed}`;
  s.appendChild(svgEl("title", {}, title));
  s.appendChild(svgEl("text", {x: 4, y: 15, "font-weight": "600"}, title));
  m.rows.forEach((row, k) => {
    s.appendChild(svgEl("text", {x: left - 6, y: top + k * cell + cell / 2 + 4, "text-anchor": "end"}, row.label));
    row.cells.forEach((v, j) => {
      const x = left + j * cell, y = top + k * cell;
      s.appendChild(svgEl("rect", {x, y, width: cell - 2, height: cell - 2, fill: v === null ? "#fff" : viridisish(v),
                                   stroke: "#ddd", "class": v === null ? "cell missing" : "cell"}));
      if (v !== null) {
        s.appendChild(svgEl("text", {x: x + cell / 2 - 1, y: y + cell / 2 + 4, "text-anchor": "middle",
                                     "class": v > 0.6 ? "on-light" : "on-dark"}, fmt(v, 2)));
      }
    });
  });
  m.tasks.forEach((t, j) => s.appendChild(svgEl("text", {x: left + j * cell + cell / 2, y: H - 34,
                                                         "text-anchor": "middle"}, t)));
  return s;
}

// ------------------------------------------------------------------ figures of one experiment

function colourOf(p, model) {
  const i = p.models.findIndex(m => m.name === model);
  return COLOURS[(i < 0 ? 0 : i) % COLOURS.length];
}

function labelOf(p, g) {
  const m = p.models.find(x => x.name === g.model);
  return `${m ? m.label : g.model} · ${g.strategy} · ${g.order_text}`;
}

function replace(id, ...nodes) {
  const box = document.getElementById(id);
  box.replaceChildren(...nodes);
}

function drawFigures(p) {
  const kl = p.kl_accuracy;
  const corr = Object.entries(kl.correlation).map(([model, c]) => {
    const m = p.models.find(x => x.name === model);
    return `${m ? m.label : model}: Pearson r = ${c.pearson === null ? "undefined" : fmt(c.pearson, 2)} (n = ${c.points})`;
  }).join("; ");
  const klSeries = p.models.map(m => ({
    label: m.label, colour: colourOf(p, m.name), lines: false,
    points: kl.points.filter(q => q.model === m.name).map(q => ({
      x: q.kl.mean, y: q.acc.mean, err: q.acc.std, big: q.step === 0,
      tip: q.step === 0 ? "base" : `${q.strategy} · ${q.order_text} · k = ${q.step}`})),
  }));
  replace("fig-kl", chart({title: corr || "KL to base vs average accuracy", series: klSeries,
                           xlabel: "KL to base (nats)", ylabel: "average accuracy", width: 720, height: 340}));

  replace("fig-avg", chart({
    title: "Average accuracy over all tasks per checkpoint", integerX: true, xlabel: "checkpoint k (0 = base)",
    ylabel: "average accuracy", width: 720, height: 320,
    series: p.avg_accuracy.map(g => ({label: labelOf(p, g), colour: colourOf(p, g.model), lines: true,
                                      dashed: g.role === "reversed", hollow: g.role === "reversed",
                                      points: g.points.map(q => ({x: q.step, y: q.mean, err: q.std}))}))}));

  replace("fig-stability", ...Object.values(p.stability).map(panel => chart({
    title: panel.label, integerX: true, xlabel: "checkpoint k", ylabel: panel.label, width: 420, height: 280,
    series: panel.series.map(g => ({label: "", colour: colourOf(p, g.model), lines: true,
                                    dashed: g.role === "reversed", hollow: g.role === "reversed",
                                    points: g.points.map(q => ({x: q.step, y: q.mean, err: q.std}))}))})));

  replace("fig-matrices", ...(p.matrices.length ? p.matrices.map(heatmap) : [el("p", {"class": "note"}, "no stage yet")]));

  replace("fig-loss", ...(p.loss.length ? p.loss.map(run => {
    let i = 0;
    const series = run.stages.map((st, j) => ({
      label: `${st.task} (k = ${st.step})`, colour: COLOURS[j % COLOURS.length], lines: true,
      points: st.losses.map(v => ({x: ++i, y: v})),
    }));
    return chart({title: `${run.strategy} · ${run.order_text} · seed ${run.seed}`, series, integerX: true,
                  xlabel: "optimizer step", ylabel: "training loss (nats)", width: 460, height: 260});
  }) : [el("p", {"class": "note"}, "no stage yet")]));
}

// ------------------------------------------------------------------ list, progress, polling

function progressText(rid, run) {
  const parts = [];
  const t = run.training, e = run.evaluation;
  if (t) {
    parts.push(t.trained ? `stage ${t.stage} (${t.task}) trained, final loss ${fmt(t.loss)}`
                         : `training stage ${t.stage} (${t.task}) step ${t.step ?? "?"}/${t.total_steps ?? "?"}, loss ${fmt(t.loss)}`);
  }
  if (e && !e.committed) parts.push(`evaluating stage ${e.stage}: ${e.done}/${e.total} examples`);
  if (!parts.length) parts.push(run.state);
  return `${rid || "base"}: ${parts.join(" · ")}`;
}

function summary(x) {
  const runs = Object.entries(x.progress || {}).filter(([rid, r]) => rid && r.training);
  return runs.length ? progressText(...runs[runs.length - 1]) : "";
}

function drawList() {
  const body = document.querySelector("#experiments tbody");
  body.replaceChildren(...experiments.map(x => {
    const tr = el("tr", {"data-id": x.id, "class": x.id === selected ? "selected" : ""});
    const created = x.created_at ? new Date(x.created_at * 1000).toLocaleString() : "";
    tr.append(el("td", {}, x.id), el("td", {}, x.name), el("td", {"class": `state-${x.state}`}, x.state),
              el("td", {}, created), el("td", {}, `${x.stages_done}/${x.stages_total}`), el("td", {}, summary(x)));
    tr.addEventListener("click", () => { location.hash = x.id; });
    return tr;
  }));
  document.getElementById("no-experiments").hidden = experiments.length > 0;
}

function drawProgress(x) {
  document.getElementById("state").textContent = x.state;
  document.getElementById("state").className = `state-${x.state}`;
  document.getElementById("stages-total").textContent = String(x.stages_total);
  document.getElementById("error").textContent = x.error || "";
  replace("progress", ...Object.entries(x.progress || {}).map(([rid, run]) => el("li", {}, progressText(rid, run))));
}

async function getJSON(url, headers) {
  const r = await fetch(url, {headers: headers || {}, credentials: "same-origin"});
  if (r.status === 304) return {status: 304};
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return {status: r.status, tag: r.headers.get("ETag"), body: await r.json()};
}

async function tick() {
  const status = document.getElementById("status");
  try {
    experiments = (await getJSON("/api/experiments")).body.experiments;
    const wanted = decodeURIComponent(location.hash.slice(1));
    if (wanted && experiments.some(x => x.id === wanted)) {
      selected = wanted;
    } else if (!experiments.some(x => x.id === selected)) {
      selected = experiments.length ? experiments[0].id : null;
    }
    drawList();
    const x = experiments.find(e => e.id === selected);
    document.getElementById("detail").hidden = !x;
    if (x) {
      drawProgress(x);
      const d = await getJSON(`/api/experiments/${encodeURIComponent(x.id)}`,
                              detailTag && detailTag.id === x.id ? {"If-None-Match": detailTag.tag} : {});
      if (d.status !== 304) {
        detailTag = {id: x.id, tag: d.tag};
        document.getElementById("title").textContent = `${x.name || x.id} (${x.id})`;
        document.getElementById("stages-done").textContent = String(d.body.stages_done);
        document.body.dataset.stagesDone = String(d.body.stages_done);
        drawFigures(d.body);
      }
    }
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "status";
  } catch (err) {  // the monitor restarting or unreachable: say so and keep polling
    status.textContent = `monitor unreachable (${err.message}); retrying`;
    status.className = "status down";
  }
  setTimeout(tick, POLL_MS);
}

window.addEventListener("hashchange", () => { detailTag = null; });
tick();
