"use strict";
// Drawn from /v1/monitor with plain DOM and inline SVG: no external script, no library.
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function headers() {
  const token = sessionStorage.getItem("cxrclip-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function cell(tr, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  tr.append(td);
}

function interval(x) {
  return x ? `${x.value.toFixed(2)} [${x.ci95[0].toFixed(2)}, ${x.ci95[1].toFixed(2)}]` : "—";
}

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function chart(name, info) {
  const width = 320, height = 110, pad = 24;
  const points = info.series.filter((p) => p.share !== null);
  const n = Math.max(points.length, 1);
  const x = (i) => pad + (n === 1 ? (width - 2 * pad) / 2 : (i * (width - 2 * pad)) / (n - 1));
  const y = (v) => height - pad - v * (height - 2 * pad);
  const box = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `share called YES for ${name}` });
  box.append(svg("line", { x1: pad, y1: y(0), x2: width - pad, y2: y(0), stroke: "#9aa5b1" }));
  box.append(svg("line", { x1: pad, y1: y(1), x2: width - pad, y2: y(1), stroke: "#dde2e7" }));
  for (const [v, text] of [[0, "0%"], [1, "100%"]]) {
    const label = svg("text", { x: 2, y: y(v) + 4, "font-size": 9, fill: "#5b6875" });
    label.textContent = text;
    box.append(label);
  }
  const banded = points.filter((p) => p.band);
  if (banded.length) {
    const upper = banded.map((p) => `${x(points.indexOf(p))},${y(p.band[1])}`);
    const lower = banded.slice().reverse().map((p) => `${x(points.indexOf(p))},${y(p.band[0])}`);
    const poly = banded.length === 1
      ? [`${x(0) - 6},${y(banded[0].band[1])}`, `${x(0) + 6},${y(banded[0].band[1])}`,
         `${x(0) + 6},${y(banded[0].band[0])}`, `${x(0) - 6},${y(banded[0].band[0])}`]
      : upper.concat(lower);
    box.append(svg("polygon", { points: poly.join(" "), fill: "#e4e8ec" }));
  }
  if (points.length > 1) {
    box.append(svg("polyline", { points: points.map((p, i) => `${x(i)},${y(p.share)}`).join(" "),
      fill: "none", stroke: "#5b8fd1", "stroke-width": 2 }));
  }
  points.forEach((p, i) => {
    const dot = svg("circle", { cx: x(i), cy: y(p.share), r: 4, fill: p.flag ? "#b3261e" : "#2f6fbf" });
    const title = svg("title", {});
    title.textContent = `${p.period}: ${p.yes} of ${p.analysed} YES, mean probability ${p.mean_probability}` +
      (p.band ? `, band ${p.band[0]}–${p.band[1]}` : "");
    dot.append(title);
    dot.dataset.flag = p.flag ? "1" : "0";
    box.append(dot);
  });
  const figure = document.createElement("figure");
  figure.className = "chart" + (info.flagged.length ? " flagged" : "");
  figure.dataset.label = name;
  const caption = document.createElement("figcaption");
  caption.textContent = name + (info.prevalence !== null ? ` (validation prevalence ${info.prevalence})` : "") +
    (info.flagged.length ? ` — outside the band: ${info.flagged.join(", ")}` : "");
  figure.append(caption, box);
  return figure;
}

async function load() {
  const period = $("period").value;
  const response = await fetch("/v1/monitor?period=" + period, { headers: headers() });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    $("model").textContent = (data.error && data.error.message) || response.statusText;
    return;
  }
  $("model").textContent = `${data.model} · calibration ${data.calibration} · ${data.predictions} images · ` +
    `${data.reviews} reviews`;
  const intake = $("intake").querySelector("tbody");
  intake.replaceChildren();
  for (const row of data.intake) {
    const tr = document.createElement("tr");
    cell(tr, row.period);
    cell(tr, row.images);
    cell(tr, row.refused);
    cell(tr, row.mean_gate_score === null ? "—" : row.mean_gate_score.toFixed(3));
    intake.append(tr);
  }
  $("charts").replaceChildren(...Object.entries(data.labels).map(([name, info]) => chart(name, info)));
  const agreement = $("agreement").querySelector("tbody");
  agreement.replaceChildren();
  for (const [name, info] of Object.entries(data.labels)) {
    const a = info.agreement;
    const tr = document.createElement("tr");
    tr.dataset.label = name;
    cell(tr, name);
    for (const k of ["reviewed", "tp", "fp", "fn", "tn"]) cell(tr, a[k]);
    cell(tr, interval(a.sensitivity));
    cell(tr, interval(a.ppv));
    agreement.append(tr);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("period").addEventListener("change", load);
  load();
});
