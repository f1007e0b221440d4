// The review page (review.html); skinvlm.js gives $, el, get, post and bootData.
"use strict";
const boot = bootData();
let item = null, mode = "view", busy = false;

for (const c of boot.classes) $("label").appendChild(el("option", c.name + " (" + c.english + ")", { value: c.name }));
$("reviewer").value = boot.reviewer;

function showText(text, findings) {
  const box = $("text"); box.replaceChildren();
  let at = 0;
  for (const f of findings.filter((f) => f.end > f.start)) {
    if (f.start < at) continue;
    box.appendChild(document.createTextNode(text.slice(at, f.start)));
    box.appendChild(el("mark", text.slice(f.start, f.end), { class: f.kind, title: f.kind })); at = f.end;
  }
  box.appendChild(document.createTextNode(text.slice(at)));
}

function render(next) {
  item = next; setMode("view"); closeAsk(); $("message").textContent = "";
  const skipped = next.progress.skipped_lines;
  $("progress").textContent = next.progress.reviewed + " / " + next.progress.records + " reviewed" +
    (skipped ? " · " + skipped + " journal lines skipped (not decisions)" : "");
  if (next.done) {
    $("heading").textContent = "Nothing left to review for you. / 검토할 기록이 없습니다.";
    $("image").removeAttribute("src"); $("text").replaceChildren(); $("flags").textContent = "";
    showSamePatient([]); $("caption").textContent = "";
    for (const id of ["accept", "editbtn", "reject"]) $(id).disabled = true;
    return;
  }
  for (const id of ["accept", "editbtn", "reject"]) $(id).disabled = false;
  $("heading").textContent = next.label + " (" + next.english + ") · " + next.view + " · " + next.split;
  $("image").src = "image/" + encodeURIComponent(next.id);
  $("photo").classList.remove("zoomed");
  $("caption").textContent = next.view + (next.same_patient.length ? " · 검토 중 under review" : "");
  showSamePatient(next.same_patient);
  $("label").value = next.label;
  $("status").textContent = next.status;
  const kinds = [...new Set(next.findings.map((f) => f.kind))];
  const flags = kinds.length ? ["audit: " + kinds.join(", ")] : [];
  if (next.probability !== null) flags.push("model's probability of " + next.label + ": " + next.probability.toFixed(2));
  $("flags").textContent = flags.join(" · ");
  showText(next.text, next.findings);
  $("edit").value = next.text; $("reason").value = "";
}

// Where patients are known, the patient's other photos (the other view, another visit) beside the one under
// review, each with its label and review status as they stand: they are decided on their own turn.
function showSamePatient(others) {
  $("photos").classList.toggle("pair", others.length > 0);
  $("others").hidden = others.length === 0;
  $("others").replaceChildren(...others.map((other) => {
    const figure = el("figure", null, { class: "same-patient" });
    const caption = el("figcaption", other.view + " · 같은 환자 same patient · " + other.label + " (" + other.english +
                       ") · " + other.status);
    figure.append(el("img", null, { src: "image/" + encodeURIComponent(other.id), alt: "same patient, " + other.view }),
                  caption);
    return figure;
  }));
}

function setMode(next) {
  mode = next;
  $("editor").hidden = mode !== "edit"; $("text").hidden = mode === "edit";
  $("save").hidden = mode !== "edit"; $("reasonrow").hidden = mode !== "reject";
  if (mode === "edit") $("edit").focus();
  if (mode === "reject") $("reason").focus();
}

// The class a text's <label> names (by a class's name or English name), or null: the page's side of the rule that
// the server keeps too (a label the page cannot read, an alias, is checked there).
function textClass(text) {
  const tag = /<label>\s*([^<]*?)\s*<\/label>/.exec(text || "");
  const named = tag && boot.classes.find((c) => c.name === tag[1] || c.english.toLowerCase() === tag[1].toLowerCase());
  return named ? named.name : null;
}

function retagged(text, label) {
  return text.replace(/<label>[^<]*<\/label>/, "<label>" + label + "</label>");
}

// What a decision comes to, as a pure function of what the clinician did: the label is always the one chosen in
// the menu, never one read from the text; where the text names another class, nothing is sent until the
// clinician picks one of the two (ask). Property-tested over every combination in the browser test.
function planDecision(decision, chosen, shownText, editedText) {
  const text = decision === "edit" ? editedText : shownText;
  const says = decision === "reject" ? null : textClass(text);
  if (says && says !== chosen) return { ask: { decision: decision, says: says, label: chosen, text: text } };
  return { send: { decision: decision, label: chosen, text: decision === "edit" ? editedText : null } };
}

function english(name) {
  const found = boot.classes.find((c) => c.name === name);
  return found ? name + " (" + found.english + ")" : name;
}

let pending = null;  // a decision waiting for the clinician to choose between the text's class and the label

function askWhich(ask) {
  pending = ask;
  $("mismatch-says").textContent = "The text says " + english(ask.says) + ", the label is " + english(ask.label) +
    " / 본문은 " + ask.says + ", 진단은 " + ask.label;
  $("keep-label").textContent = "Keep " + ask.label + ": write it in the text / 진단 유지";
  $("take-text").textContent = "Change the diagnosis to " + ask.says + " / 진단 변경";
  $("mismatch").hidden = false;
  $("keep-label").focus();
}

function closeAsk() { pending = null; $("mismatch").hidden = true; }

async function decide(decision) {
  if (busy || !item || item.done) return;
  const plan = planDecision(decision, $("label").value, item.text, $("edit").value);
  if (plan.ask) { askWhich(plan.ask); return; }
  await send(plan.send);
}

async function send(chosen) {
  busy = true; closeAsk();
  const body = {id: item.id, version: item.version, decision: chosen.decision, label: chosen.label,
                text: chosen.text, reason: $("reason").value};
  try { render(await post("api/decide", body)); }
  catch (error) {
    $("message").textContent = error.message;
    // the record changed under us (another reviewer): show it as it is now, and say why
    try { render(await get("api/next")); $("message").textContent = error.message; } catch (_) {}
  }
  finally { busy = false; }
}

$("keep-label").onclick = () => {  // the label stands; the text's tag is brought into line with it: an edit
  const ask = pending;
  if (ask) send({ decision: "edit", label: ask.label, text: retagged(ask.text, ask.label) });
};
$("take-text").onclick = () => {  // the clinician changes the diagnosis to the text's class, by this click alone
  const ask = pending;
  if (!ask) return;
  $("label").value = ask.says;
  send({ decision: ask.decision, label: ask.says, text: ask.decision === "edit" ? ask.text : null });
};

async function undo() {
  if (busy) return;
  busy = true;
  try { render(await post("api/undo", {})); $("message").textContent = "Undone: decide it again / 되돌렸습니다"; }
  catch (error) { $("message").textContent = error.message; }
  finally { busy = false; }
}

$("accept").onclick = () => decide("accept");
$("undo").onclick = undo;
$("editbtn").onclick = () => setMode("edit");
$("reject").onclick = () => mode === "reject" ? decide("reject") : setMode("reject");
$("save").onclick = () => decide("edit");
$("image").onclick = () => $("photo").classList.toggle("zoomed");
$("reviewer").onchange = async () => {
  try { render(await post("api/reviewer", {reviewer: $("reviewer").value})); }
  catch (error) { $("message").textContent = error.message; }
};

// Korean is typed through an input method: a key pressed while a syllable is being composed belongs to it,
// so nothing is saved or submitted until the composition ends.
$("edit").addEventListener("keydown", (e) => {
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); decide("edit"); }
  if (e.key === "Escape") { e.preventDefault(); closeAsk(); setMode("view"); }
});
$("reason").addEventListener("keydown", (e) => {
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter") { e.preventDefault(); decide("reject"); }
  if (e.key === "Escape") { e.preventDefault(); setMode("view"); }
});
document.addEventListener("keydown", (e) => {
  if (e.isComposing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (pending && e.key === "Escape") { e.preventDefault(); closeAsk(); return; }
  if (pending) return;  // the choice is made with its own two buttons
  if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) return;
  const key = e.key.toLowerCase();
  if (key === "a") { e.preventDefault(); decide("accept"); }
  else if (key === "e") { e.preventDefault(); setMode("edit"); }
  else if (key === "r") { e.preventDefault(); setMode("reject"); }
  else if (key === "u") { e.preventDefault(); undo(); }
  else if (key === "z") { e.preventDefault(); $("photo").classList.toggle("zoomed"); }
});

render(boot.item);
