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
  item = next; setMode("view"); $("message").textContent = "";
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

async function decide(decision) {
  if (busy || !item || item.done) return;
  busy = true;
  const body = {id: item.id, version: item.version, decision: decision, label: $("label").value,
                text: decision === "edit" ? $("edit").value : null, reason: $("reason").value};
  try { render(await post("api/decide", body)); }
  catch (error) {
    $("message").textContent = error.message;
    // the record changed under us (another reviewer): show it as it is now, and say why
    try { render(await get("api/next")); $("message").textContent = error.message; } catch (_) {}
  }
  finally { busy = false; }
}

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

// The label written in an edited text drives the menu, so the two never disagree when the edit is saved.
$("edit").addEventListener("input", () => {
  const tag = /<label>\s*([^<]*?)\s*<\/label>/.exec($("edit").value);
  const named = tag && boot.classes.find((c) => c.name === tag[1] || c.english.toLowerCase() === tag[1].toLowerCase());
  if (named && $("label").value !== named.name) {
    $("label").value = named.name;
    $("message").textContent = "Label set from the text / 본문의 진단으로 바꿈: " + named.name;
  }
});

// Korean is typed through an input method: a key pressed while a syllable is being composed belongs to it,
// so nothing is saved or submitted until the composition ends.
$("edit").addEventListener("keydown", (e) => {
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); decide("edit"); }
  if (e.key === "Escape") { e.preventDefault(); setMode("view"); }
});
$("reason").addEventListener("keydown", (e) => {
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter") { e.preventDefault(); decide("reject"); }
  if (e.key === "Escape") { e.preventDefault(); setMode("view"); }
});
document.addEventListener("keydown", (e) => {
  if (e.isComposing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) return;
  const key = e.key.toLowerCase();
  if (key === "a") { e.preventDefault(); decide("accept"); }
  else if (key === "e") { e.preventDefault(); setMode("edit"); }
  else if (key === "r") { e.preventDefault(); setMode("reject"); }
  else if (key === "u") { e.preventDefault(); undo(); }
  else if (key === "z") { e.preventDefault(); $("photo").classList.toggle("zoomed"); }
});

render(boot.item);
