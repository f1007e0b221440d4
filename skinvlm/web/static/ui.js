// The ui page (ui.html); skinvlm.js gives $, el, get, post: every string from the workspace goes in as text.
"use strict";
let FORMS = {};  // each job's fields, as the server builds them from the CLI command (api/forms)
let shownRun = null;

function fixed(value) { return typeof value === "number" ? value.toFixed(4) : (value ?? "-"); }
function row(cells) {
  const tr = el("tr");
  for (const cell of cells) { const td = el("td"); if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? ""; tr.append(td); }
  return tr;
}
// Each stage of the overview opens its page: the texts the review, an adapter its training run, an eval run its
// figures.
function stageLink(name) {
  const tab = { described: "review", fixed: "review", adapter: "training", merged: "evaluation" }[name] ||
    (name.startsWith("models/") ? "training" : name.startsWith("eval/") ? "evaluation" : null);
  if (!tab) return name;
  const link = el("button", name, { type: "button", class: "link", "data-stage": name });
  link.addEventListener("click", () => {
    showTab(tab);
    if (tab === "training") { shownRun = name.replace(/^models\//, ""); $("run").value = shownRun; training(); }
    if (name.startsWith("eval/")) evalDetail(name.slice("eval/".length));
  });
  return link;
}

function showTab(name) {
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === name));
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
}

async function overview() {
  const found = await get("/api/overview");
  $("workspace").textContent = found.workspace;
  $("next").textContent = found.next;
  $("no-review").textContent = found.review ? `(not yet: ${found.review})` : "";
  $("leakage").textContent = found.leakage ? "LEAKAGE: " + found.leakage : "";
  const body = document.querySelector("#stages tbody");
  body.replaceChildren(...found.stages.map((s) => {
    const rows = Object.entries(s.rows || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    const tr = row([stageLink(s.name), rows, (s.finished || "").slice(0, 16), s.figures, (s.rerun || []).join(", ")]);
    if (s.stale) tr.classList.add("stale");
    return tr;
  }));
}

function jobFields() {
  const command = document.querySelector('#job-form select[name="command"]').value;
  $("job-fields").replaceChildren(...(FORMS[command] || []).map(formField));
}

// One field of a job's form: a check box for a switch, a menu for a choice, else a text box showing the command's
// default (left empty, the command's own default applies); the flag's help as its tooltip.
function formField(field) {
  const label = el("label", field.name + " ", { title: field.help });
  if (field.kind === "switch") {
    const box = el("input", null, { name: field.name, type: "checkbox" });
    box.checked = field.checked;
    label.append(box);
  } else if (field.kind === "choice") {
    const menu = el("select", null, { name: field.name });
    for (const choice of field.choices) menu.append(el("option", choice, { value: choice }));
    menu.value = field.default ?? field.choices[0];
    label.append(menu);
  } else {
    const wide = ["model-dir", "from", "model", "base-url", "config"].includes(field.name);
    label.append(el("input", null, { name: field.name, placeholder: field.default ?? "", size: wide ? 30 : 12,
                                     inputmode: field.kind === "number" ? "decimal" : "text" }));
  }
  return label;
}

async function loadForms() {
  FORMS = await get("/api/forms");
  jobFields();
}

async function startJob(event) {
  event.preventDefault();
  const form = event.target;
  const fields = {};
  form.querySelectorAll("#job-fields input, #job-fields select").forEach((input) => {
    if (input.type === "checkbox") { if (input.checked) fields[input.name] = true; } else if (input.value) fields[input.name] = input.value;
  });
  const error = $("job-error");
  error.textContent = "";
  try {
    await post("/api/jobs", { command: form.command.value, fields });
    await jobs();
  } catch (problem) { error.textContent = problem.message; }
}

async function jobs() {
  const found = await get("/api/jobs");
  const body = document.querySelector("#job-list tbody");
  body.replaceChildren(...found.map((job) => {
    const actions = el("span");
    const log = el("button", "로그 Log", { type: "button" });
    log.addEventListener("click", async () => { $("job-log").textContent = await get(`/api/jobs/${job.id}/log`); });
    actions.append(log);
    if (job.status === "running") {
      const stop = el("button", "중지 Stop", { type: "button", class: "stop" });
      stop.addEventListener("click", async () => { await post(`/api/jobs/${job.id}/stop`); await jobs(); });
      actions.append(stop);
    }
    const tr = row([el("code", job.command), job.status + (job.returncode !== null ? ` (${job.returncode})` : ""), job.started.slice(0, 19), actions]);
    tr.dataset.job = job.id;
    return tr;
  }));
}

function draw(run) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const w = 640, h = 260, pad = 30;
  const key = run.points.some((p) => p.reward !== null && p.reward !== undefined) ? "reward" : "loss";
  $("curve-name").textContent = key === "reward" ? "mean reward" : "loss";
  const curve = run.points.filter((p) => p[key] !== null && p[key] !== undefined);
  const f1 = run.points.filter((p) => p.eval_macro_f1 !== null && p.eval_macro_f1 !== undefined);
  const last = Math.max(1, run.max_steps || 0, ...run.points.map((p) => p.step));
  const top = Math.max(1e-9, ...curve.map((p) => p[key]));
  const x = (step) => pad + (w - 2 * pad) * step / last;
  const y = (value, max) => h - pad - (h - 2 * pad) * value / max;
  const nodes = [];
  const axis = document.createElementNS(ns, "path");
  axis.setAttribute("d", `M${pad},${pad} V${h - pad} H${w - pad}`);
  axis.setAttribute("stroke", "#8a93a6"); axis.setAttribute("fill", "none");
  nodes.push(axis);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", curve.map((p) => `${x(p.step).toFixed(1)},${y(p[key], top).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2f6fdf"); line.setAttribute("stroke-width", "1.5");
  line.setAttribute("class", "curve");
  nodes.push(line);
  for (const p of f1) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x(p.step).toFixed(1)); dot.setAttribute("cy", y(p.eval_macro_f1, 1).toFixed(1));
    dot.setAttribute("r", "3.5"); dot.setAttribute("fill", "#d2691e"); dot.setAttribute("class", "f1");
    nodes.push(dot);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", w - pad); label.setAttribute("y", h - 8); label.setAttribute("text-anchor", "end");
  label.textContent = `step ${last}`;
  nodes.push(label);
  svg.replaceChildren(...nodes);
  $("step").textContent = `step ${run.step} / ${run.max_steps ?? "?"}`;
  $("speed").textContent = run.s_per_step ? `${run.s_per_step} s/step` : "-";
  $("eta").textContent = run.eta_s !== null && run.eta_s !== undefined && !run.finished ? `ETA ${run.eta_s} s` : (run.finished ? "finished" : "-");
  $("memory").textContent = run.peak_vram_mb ? `peak VRAM ${run.peak_vram_mb} MiB` : "CPU";
  $("eval-f1").textContent = f1.length ? f1[f1.length - 1].eval_macro_f1 : "-";
  const settings = document.querySelector("#run-settings tbody");
  settings.replaceChildren(...Object.entries(run.settings).filter(([, v]) => v !== null).map(([k, v]) => row([k, String(v)])),
                           row(["best step", run.best_step ?? "-"]));
}

async function training() {
  const runs = await get("/api/train");
  const select = $("run");
  const names = runs.map((r) => r.name);
  if (select.options.length !== names.length || [...select.options].some((o, i) => o.value !== names[i])) {
    select.replaceChildren(...names.map((n) => el("option", n, { value: n })));
    if (shownRun && names.includes(shownRun)) select.value = shownRun;
  }
  shownRun = select.value || names[0];
  const run = runs.find((r) => r.name === shownRun);
  if (run) draw(run);
}

async function compareRuns() {
  const first = $("first").value, second = $("second").value;
  const box = $("compared");
  try {
    const pair = await get(`/api/compare?first=${encodeURIComponent(first)}&second=${encodeURIComponent(second)}`);
    const d = pair.difference;
    box.textContent = `${second} - ${first} on ${pair.n} photos: accuracy ${d.accuracy.value} (95% ${d.accuracy.interval.join(" to ")}), ` +
      `macro F1 ${d.macro_f1.value} (95% ${d.macro_f1.interval.join(" to ")}), resampled by ${pair.resampled}. ${pair.said}`;
  } catch (problem) { box.textContent = problem.message; }
}

async function evaluation() {
  const runs = await get("/api/eval");
  for (const id of ["first", "second"]) {
    const select = $(id);
    const names = runs.map((r) => r.name);
    if ([...select.options].map((o) => o.value).join() !== names.join()) {
      const kept = select.value;
      select.replaceChildren(...names.map((n) => el("option", n, { value: n })));
      if (names.includes(kept)) select.value = kept;
    }
  }
  const body = document.querySelector("#eval-list tbody");
  body.replaceChildren(...runs.map((r) => {
    const open = el("button", r.name, { type: "button", "data-run": r.name });
    open.addEventListener("click", () => evalDetail(r.name));
    return row([open, r.n, fixed(r.accuracy), fixed(r.macro_f1), r.unparsed]);
  }));
}

async function evalDetail(name) {
  const run = await get(`/api/eval/${encodeURIComponent(name)}`);
  const box = $("eval-detail");
  const figures = el("p");
  const f1 = el("strong", fixed(run.macro_f1), { id: "detail-macro-f1" });
  const interval = run.intervals && run.intervals.macro_f1 ? ` (95%: ${run.intervals.macro_f1.join(" - ")})` : "";
  figures.append(`${run.name}: accuracy ${fixed(run.accuracy)}, macro F1 `, f1, `${interval}, ${run.n} photos, unparsed ${run.unparsed}`);
  const parts = [el("h3", run.name), figures];
  const perClass = el("table");
  for (const [label, scores] of Object.entries(run.per_class || {})) {
    perClass.append(row([label, `F1 ${scores["f1-score"] ?? scores.f1 ?? ""}`, `n ${scores.support ?? ""}`]));
  }
  parts.push(perClass);
  const perView = el("table");
  const viewIntervals = (run.intervals || {}).per_view || {};
  for (const [view, accuracy] of Object.entries(run.per_view || {})) {
    const interval = viewIntervals[view] ? ` (95%: ${viewIntervals[view].join(" - ")})` : "";
    perView.append(row([view, `accuracy ${fixed(accuracy)}${interval}`]));
  }
  parts.push(perView);
  for (const file of run.files) {
    const path = `/eval/${encodeURIComponent(name)}/${file}`;
    if (file.endsWith(".png")) parts.push(el("img", null, { src: path, alt: file, class: file.replace(".png", "") }));
    else { const link = el("a", "report.html", { href: path, target: "_blank", rel: "noopener" }); parts.push(el("p")); parts[parts.length - 1].append(link); }
  }
  box.replaceChildren(...parts);
}

async function refresh() {
  const tasks = [overview(), jobs(), training(), evaluation()];
  await Promise.allSettled(tasks);
}

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
document.querySelector('#job-form select[name="command"]').addEventListener("change", jobFields);
$("job-form").addEventListener("submit", startJob);
$("compare").addEventListener("click", compareRuns);
$("run").addEventListener("change", (e) => { shownRun = e.target.value; training(); });
loadForms();
refresh();
setInterval(refresh, 1500);
