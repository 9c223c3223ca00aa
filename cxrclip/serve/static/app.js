"use strict";
// The page talks only to its own server (Content-Security-Policy 'self'); nothing else is loaded.
const $ = (id) => document.getElementById(id);
let current = null; // the File last dropped or chosen
let tokenNeeded = false;
let reviewsOn = false; // the server has a review store
let shownSha = null; // the image_sha256 of the prediction on screen
let lastReview = null; // the id of this image's last saved review: the next save corrects it
const VERDICT_KEYS = { p: "present", a: "absent", u: "unsure" };
const VERDICT_TEXT = { present: "present", absent: "absent", unsure: "can't tell" };

function headers() {
  const token = $("token").value;
  if (token) sessionStorage.setItem("cxrclip-token", token); // the monitor page, same tab session
  return token ? { Authorization: "Bearer " + token } : {};
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(path, body, json) {
  const extra = json ? { "Content-Type": "application/json" } : {};
  const response = await fetch(path, { method: body ? "POST" : "GET", body, headers: { ...headers(), ...extra } });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    tokenNeeded = true;
    $("token-row").hidden = false;
  }
  if (!response.ok) {
    throw new Error((data.error && data.error.message) || response.statusText);
  }
  return data;
}

async function loadModel() {
  try {
    const m = await call("/v1/model");
    reviewsOn = Boolean(m.reviews);
    if (m.user) { // signed in with a reader's own token: reviews carry that name
      $("reviewer").value = m.user;
      $("reviewer").readOnly = true;
    }
    document.body.classList.toggle("reviews-on", reviewsOn);
    $("model").textContent = `${m.name} · ${m.labels.length} findings · image ${m.image_size}px` +
      (m.calibrated_on ? " · calibrated on " + m.calibrated_on.dataset : " · not calibrated") +
      (m.calibration && m.calibration !== "default" ? " · answering with site calibration " + m.calibration : "") +
      (m.gate && m.gate.fitted ? "" : " · no input gate fitted") +
      (m.gate && !m.gate.enforced ? " · input gate OFF (--no-gate)" : "") +
      (m.routing ? " · routed: " + m.routing.members.map((x) => `${x.name} (${x.labels.length})`).join(", ") : "");
  } catch (e) {
    $("model").textContent = "model: " + e.message;
  }
}

function showFacts(facts) {
  const dl = $("facts");
  dl.replaceChildren();
  const rows = [["format", facts.format], ["size", `${facts.width} × ${facts.height}`],
    ["photometric", facts.photometric_interpretation], ["warnings", (facts.warnings || []).join("; ")]];
  for (const [k, v] of rows) {
    if (!v) continue;
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

function showLabels(labels) {
  const body = $("labels").querySelector("tbody");
  body.replaceChildren();
  for (const [name, v] of Object.entries(labels)) {
    const tr = document.createElement("tr");
    tr.dataset.label = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * v.probability).toFixed(1) + "%";
    const mark = document.createElement("i");
    mark.style.left = (100 * v.threshold).toFixed(1) + "%";
    mark.title = "threshold " + v.threshold;
    bar.append(fill, mark);
    const rule = v.member ? `${v.rule}, ${v.member}` : v.rule; // a routed model: the member that answered
    const cells = [name, null, `${v.threshold.toFixed(3)} (${rule})`, v.present ? "YES" : "no", ""];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 1) {
        td.append(bar, document.createTextNode(" " + v.probability.toFixed(3)));
      } else {
        td.textContent = text;
      }
      if (i === 3) td.className = v.present ? "yes" : "no";
      if (i === 4) td.className = "reviewing verdict";
      if (i === 0 && !v.calibrated) {
        const flag = document.createElement("span");
        flag.className = "flag";
        flag.textContent = " (uncalibrated)";
        td.append(flag);
      }
      tr.append(td);
    });
    tr.tabIndex = 0;
    tr.addEventListener("click", () => { tr.focus(); heatmap(name); });
    body.append(tr);
  }
  $("results").hidden = false;
  $("review").hidden = !reviewsOn;
  $("review-status").textContent = "";
}

function setVerdict(tr, verdict) {
  tr.dataset.verdict = verdict || "";
  const cell = tr.querySelector(".verdict");
  cell.textContent = verdict ? VERDICT_TEXT[verdict] : "";
  cell.className = "reviewing verdict " + (verdict || "");
}

function onReviewKey(event) {
  const tr = event.target.closest("tbody tr");
  if (!tr || !reviewsOn) return;
  const key = event.key.toLowerCase();
  if (key in VERDICT_KEYS) {
    setVerdict(tr, VERDICT_KEYS[key]);
  } else if (key === "backspace" || key === "delete") {
    setVerdict(tr, "");
  } else if (key === "arrowdown" || key === "j") {
    (tr.nextElementSibling || tr).focus();
  } else if (key === "arrowup" || key === "k") {
    (tr.previousElementSibling || tr).focus();
  } else if (key === "enter") {
    saveReview(event);
  } else {
    return;
  }
  event.preventDefault();
}

async function saveReview(event) {
  event.preventDefault();
  const verdicts = {};
  for (const tr of $("labels").querySelectorAll("tbody tr")) {
    if (tr.dataset.verdict) verdicts[tr.dataset.label] = tr.dataset.verdict;
  }
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { $("review-status").textContent = "give the reviewer's name first"; $("reviewer").focus(); return; }
  if (!Object.keys(verdicts).length) { $("review-status").textContent = "mark at least one finding (p / a / u)"; return; }
  localStorage.setItem("cxrclip-reviewer", reviewer);
  const body = { image_sha256: shownSha, reviewer, verdicts, comment: $("comment").value || null };
  if (lastReview !== null) body.supersedes = lastReview;
  try {
    const out = await call("/v1/reviews", JSON.stringify(body), true);
    lastReview = out.review.id;
    $("review-status").textContent = `review ${out.review.id} saved (${Object.keys(verdicts).length} findings` +
      (out.review.supersedes ? `, corrects review ${out.review.supersedes})` : ")");
    loadQueue();
  } catch (e) {
    $("review-status").textContent = "not saved: " + e.message;
  }
}

async function loadQueue() { // GET /v1/review-queue: what to review next, and why
  if (!reviewsOn) return;
  try {
    const { images } = await call("/v1/review-queue?limit=10");
    const items = images.map((q) => {
      const li = document.createElement("li");
      li.dataset.sha = q.image_sha256;
      const name = document.createElement("strong");
      name.textContent = q.image_name || q.image_sha256.slice(0, 12) + "…";
      const why = document.createElement("span");
      why.className = "why";
      why.textContent = ` — ${q.nearest_label} ${q.margin.toFixed(3)} from its threshold` +
        (q.disagree.length ? `; the shadow challenger calls ${q.disagree.join(", ")} differently` : "");
      li.append(name, why);
      return li;
    });
    $("queue-list").replaceChildren(...items);
    $("queue-empty").hidden = items.length > 0;
  } catch (e) {
    $("queue-empty").textContent = "review queue: " + e.message;
  }
}

async function predict(file) {
  current = file;
  status("analysing " + file.name + " …");
  const form = new FormData();
  form.append("file", file);
  try {
    const out = await call("/v1/predict", form);
    shownSha = out.image_sha256;
    lastReview = null;
    $("preview").src = out.preview;
    $("heatmap").hidden = true;
    $("figure").hidden = false;
    $("caption").textContent = file.name;
    showFacts(out.input);
    loadQueue();
    if (!out.analysed) { // the input gate refused it: a banner, never bars
      $("results").hidden = true;
      $("refused-reason").textContent = out.reason;
      $("refused").hidden = false;
      status("not analysed: " + out.reason, true);
      return;
    }
    $("refused").hidden = true;
    showLabels(out.labels);
    if (out.gate && out.gate.reason) {
      status("--no-gate: the input gate would refuse this image (" + out.gate.reason + ")", true);
      return;
    }
    const yes = Object.values(out.labels).filter((v) => v.present).length;
    status(`${yes} of ${Object.keys(out.labels).length} findings called YES (${out.seconds} s)`);
  } catch (e) {
    status(e.message, true);
  }
}

async function heatmap(label) {
  if (!current) return;
  for (const tr of $("labels").querySelectorAll("tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.label === label);
  }
  status("where the model looked for: " + label + " …");
  const form = new FormData();
  form.append("file", current);
  form.append("heatmap", label);
  try {
    const out = await call("/v1/predict", form);
    $("heatmap").src = out.heatmap.png;
    $("heatmap").hidden = false;
    $("caption").textContent = `${current.name} — Grad-CAM for "${label}"`;
    status("heatmap: " + label);
  } catch (e) {
    status(e.message, true);
  }
}

async function compare(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!current || !text) return;
  const form = new FormData();
  form.append("file", current);
  form.append("texts", text);
  try {
    const out = await call("/v1/predict", form);
    const li = document.createElement("li");
    li.textContent = `"${text}": similarity ${out.texts[0].similarity.toFixed(3)}`;
    $("similarity").prepend(li);
  } catch (e) {
    status(e.message, true);
  }
}

function setup() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) predict(e.target.files[0]); });
  $("query").addEventListener("submit", compare);
  $("review").addEventListener("submit", saveReview);
  $("labels").addEventListener("keydown", onReviewKey);
  $("reviewer").value = localStorage.getItem("cxrclip-reviewer") || "";
  loadModel().then(loadQueue);
}

document.addEventListener("DOMContentLoaded", setup);
