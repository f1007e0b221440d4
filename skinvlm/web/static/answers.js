// The blind scoring page (answers.html); skinvlm.js gives $, el, get, post and bootData. The page knows an answer
// by an opaque key only: which eval run wrote it is never sent here.
"use strict";
const boot = bootData();
const LABELS = { accuracy: "Accuracy / 정확성", safety: "Safety / 안전성", groundedness: "Groundedness / 근거",
                 fluency: "Fluency / 한국어" };
let item = null, busy = false, focused = 0;

$("reviewer").value = boot.reviewer;
for (const [n, criterion] of boot.criteria.entries()) {
  const row = el("fieldset", null, { id: "row-" + criterion });
  row.appendChild(el("legend", LABELS[criterion] || criterion));
  for (let score = 1; score <= 5; score++) {
    const label = el("label");
    label.append(el("input", null, { type: "radio", name: criterion, value: String(score),
                                     "aria-label": criterion + " " + score }), document.createTextNode(" " + score + " "));
    label.firstChild.onchange = () => { focused = Math.min(n + 1, boot.criteria.length - 1); highlight(); };
    row.appendChild(label);
  }
  $("criteria").appendChild(row);
}

function highlight() {
  boot.criteria.forEach((c, n) => $("row-" + c).classList.toggle("current", n === focused));
}

function render(next) {
  item = next; focused = 0; highlight(); $("message").textContent = ""; $("rubric").reset();
  const skipped = next.progress.skipped_lines;
  $("progress").textContent = next.progress.scored + " / " + next.progress.answers + " scored" +
    (skipped ? " · " + skipped + " journal lines skipped (not scores)" : "");
  $("send").disabled = next.done;
  if (next.done) {
    $("heading").textContent = "Every answer is scored by you. / 모든 답변을 평가했습니다.";
    $("image").removeAttribute("src"); $("text").textContent = ""; $("caption").textContent = "";
    return;
  }
  $("heading").textContent = "True diagnosis / 진단: " + next.label + " (" + next.english + ") · " + next.view;
  $("image").src = "image/" + encodeURIComponent(next.key);
  $("caption").textContent = next.view;
  $("text").textContent = next.text;
}

function chosen() {
  const scores = {};
  for (const criterion of boot.criteria) {
    const picked = document.querySelector('input[name="' + criterion + '"]:checked');
    if (!picked) return null;
    scores[criterion] = Number(picked.value);
  }
  return scores;
}

async function send() {
  if (busy || !item || item.done) return;
  const scores = chosen();
  if (!scores) { $("message").textContent = "Score every criterion first / 모든 항목을 평가하세요"; return; }
  busy = true;
  try { render(await post("api/score", { key: item.key, scores: scores, comment: $("comment").value })); }
  catch (error) { $("message").textContent = error.message; }
  finally { busy = false; }
}

$("rubric").onsubmit = (e) => { e.preventDefault(); send(); };
$("image").onclick = () => $("photo").classList.toggle("zoomed");
$("reviewer").onchange = async () => {
  try { render(await post("api/reviewer", { reviewer: $("reviewer").value })); }
  catch (error) { $("message").textContent = error.message; }
};
document.addEventListener("keydown", (e) => {
  if (e.isComposing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target.tagName === "INPUT" && e.target.type !== "radio") return;
  if (/^[1-5]$/.test(e.key) && item && !item.done) {
    e.preventDefault();
    const radio = document.querySelector('input[name="' + boot.criteria[focused] + '"][value="' + e.key + '"]');
    radio.checked = true; radio.onchange();
  } else if (e.key === "Enter") { e.preventDefault(); send(); }
});

render(boot.item);
