"""`eval/<run>/report.html`: one self-contained page to look at a run photo by photo, offline.

The headline figures with their intervals, the confusion matrix (each cell shows its photos), per-class and
per-view tables, and every photo as a small inlined thumbnail with its true and predicted label, the class
probabilities and the model's whole answer; errors are shown first and alone until a cell or a filter asks
for others. No network, no external script or font: it opens from a USB stick in a clinic. Hangul is drawn
with an embedded font cut to the page's own characters, so a machine without Korean fonts shows no empty boxes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path
from typing import Any

from skinvlm import checklist, devices, leakage
from skinvlm.eval_result import EvalResult
from skinvlm.images import as_rgb
from skinvlm.numbers import score
from skinvlm.rules import Rules
from skinvlm.workspace import write_text

THUMBNAIL_SIDE = 112
UNPARSED = "unparsed"


def thumbnail(image: Any) -> str:
    """A JPEG data URI of about 3 KB: enough to recognise a photo, small enough for 1,200 in one page."""
    small = as_rgb(image)
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnails(ds: Any, indices: dict[str, int]) -> dict[str, str]:
    """Thumbnails by record id; decoding runs on threads (Pillow releases the GIL while it inflates)."""
    ids = list(indices)
    with ThreadPoolExecutor(devices.cpu_count()) as pool:
        made = pool.map(lambda rid: thumbnail(ds[indices[rid]]["image"]), ids)
        return dict(zip(ids, made, strict=True))


def write_report(
    path: Path, result: EvalResult, records: list[dict[str, Any]], rules: Rules, images: dict[str, str]
) -> None:
    html = page(result, records, rules, images)
    write_text(path, html.replace("</style>", hangul_font_face(html) + "</style>", 1))


HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
HANGUL_RANGES = "U+1100-11FF, U+3130-318F, U+AC00-D7A3"


def hangul_font_file() -> Path | None:
    """NanumGothic as koreanize-matplotlib ships it (SIL Open Font License), or None where it is not installed.
    Found without importing that package, whose import sets matplotlib's fonts globally and warns of its own
    use of distutils."""
    import importlib.util

    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "fonts" / "NanumGothic.ttf"
    return source if source.is_file() else None


def hangul_woff(characters: str) -> bytes | None:
    """NanumGothic cut to `characters`, as WOFF (a form Chromium's font sanitiser takes; the shipped TTF it
    refuses), or None without the font, fontTools or characters."""
    try:
        from fontTools import subset
    except ImportError:
        return None
    source = hangul_font_file()
    if not (source and characters):
        return None
    options = subset.Options()
    options.flavor = "woff"  # zlib-compressed; woff2 would need brotli
    # NanumGothic's VTT hinting sources: of no use on a screen, and fontTools prints a warning for each it drops
    options.drop_tables += ["TSI0", "TSI1", "TSI2", "TSI3", "TSI5"]
    font = subset.load_font(str(source), options)
    cutter = subset.Subsetter(options)
    cutter.populate(text=characters)
    cutter.subset(font)
    buffer = io.BytesIO()
    subset.save_font(font, buffer, options)
    return buffer.getvalue()


def hangul_font_face(html: str) -> str:
    """@font-face for Hangul: NanumGothic (SIL Open Font License, the copy koreanize-matplotlib ships) cut by
    fontTools to the syllables this page uses (tens of KB, not 4 MB), as a data URL; used for Hangul only
    (unicode-range), Latin text keeps the system font. Empty where the font is not installed."""
    woff = hangul_woff("".join(sorted(set(HANGUL.findall(html)))))
    if woff is None:
        return ""
    data = base64.b64encode(woff).decode()
    return (
        f"@font-face {{ font-family: SkinvlmHangul; src: url(data:font/woff;base64,{data}) format('woff'); "
        f"unicode-range: {HANGUL_RANGES}; }}\n"
    )


def page(result: EvalResult, records: list[dict[str, Any]], rules: Rules, images: dict[str, str]) -> str:
    title = f"skinvlm eval {result['name']}"
    return f"""<!doctype html>
<html lang="ko"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{policy()}">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="sub">{escape(result["backend"])}; {result["n"]} photos</p>
{headline(result)}
<h2>Confusion matrix</h2>
<p class="sub">Rows: true class; columns: predicted. Click a cell to see its photos.</p>
{matrix(result, rules)}
<h2>Per class</h2>
{per_class(result, rules)}
<h2>Per view</h2>
{per_view(result)}
{per_subgroup(result)}
{referral(result)}
{checklist.html(result["checklist"]) if result.get("checklist") else ""}
<h2 id="photos">Photos</h2>
{filters(result)}
<div id="gallery">
{
        "".join(
            figure(record, images.get(record["id"], ""), rules, threshold(result))
            for record in sorted(records, key=gallery_order)
        )
    }
</div>
<script>{SCRIPT}</script>
</body></html>
"""


def policy() -> str:
    """What the page may run and load, opened from disk or served: skinvlm's own script (by the hash of SCRIPT,
    never one read from the file, so text that slipped past an escape stays inert), its inline style (the
    confusion matrix colours its cells with style attributes), photos and font as data: URLs; nothing from
    elsewhere. In the page's <meta> and, from `skinvlm ui`, as its header too."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
        "font-src data:; base-uri 'none'; form-action 'none'"
    )


def gallery_order(record: dict[str, Any]) -> tuple[bool, str, str]:
    return (record["predicted"] == record["label"], record["label"], record["id"])


def interval(result: EvalResult, metric: str) -> str:
    low, high = result["intervals"][metric]
    return f'<span class="ci">95% CI {low:.3f}&ndash;{high:.3f}</span>'


def headline(result: EvalResult) -> str:
    cards = [
        ("images", f'<b id="n">{result["n"]}</b>'),
        ("accuracy", f'<b id="accuracy">{result["accuracy"]:.4f}</b>{interval(result, "accuracy")}'),
        ("macro F1", f'<b id="macro-f1">{result["macro_f1"]:.4f}</b>{interval(result, "macro_f1")}'),
        ("unparsed", f'<b id="unparsed">{result["unparsed"]}</b>'),
    ]
    if probabilities := result.get("probabilities"):
        cards += [
            (
                "macro AUC",
                f'<b id="macro-auc">{score(probabilities["macro_auc"])}</b>'
                + (span(probabilities["macro_auc_interval"]) if probabilities.get("macro_auc_interval") else ""),
            ),
            ("top-2 accuracy", f'<b id="top2">{score(probabilities["top2_accuracy"])}</b>'),
            (
                "calibration error",
                f'<b id="ece">{score(probabilities["ece"])}</b>'
                + (span(probabilities["ece_interval"]) if "ece_interval" in probabilities else "")
                + f'<span class="ci">ECE, top class; {calibrated(probabilities)}</span>',
            ),
        ]
    shown = '<div class="cards">' + "".join(f"<div><i>{k}</i>{v}</div>" for k, v in cards) + "</div>"
    leak = leakage.warning(result.get("leakage"))
    return (f'<p class="note" id="leakage">{escape(leak)}</p>' if leak else "") + shown


def class_name(label: str, rules: Rules) -> str:
    return f"{escape(label)} <small>{escape(rules.english(label))}</small>" if label != UNPARSED else UNPARSED


def matrix_axes(result: EvalResult) -> tuple[list[str], list[str], list[list[int]]]:
    """(rows: the true classes, columns: the predicted labels, the counts) of a run's confusion matrix, from this
    version's metrics.json or an older one (whose `labels` held unparsed too, a row of zeros)."""
    columns = result.get("predicted_labels") or result["labels"]
    rows = [label for label in result["labels"] if label != UNPARSED]
    return rows, columns, result["confusion_matrix"][: len(rows)]


def matrix(result: EvalResult, rules: Rules) -> str:
    classes, labels, counts = matrix_axes(result)
    shown = labels if any(row[-1] for row in counts) else labels[:-1]
    head = "".join(f"<th>{class_name(label, rules)}</th>" for label in shown)
    rows = []
    for truth, row in zip(classes, counts, strict=True):
        total = sum(row) or 1
        cells = "".join(
            f'<td><button class="cell{" diagonal" if truth == predicted else ""}" data-true="{escape(truth)}" '
            f'data-pred="{escape(predicted)}" style="background: rgba(33, 102, 172, {count / total:.3f});'
            f'{" color: white;" if count / total > 0.5 else ""}" '
            f'title="{count} of {sum(row)} {escape(truth)} photos">{count}</button></td>'
            for predicted, count in zip(labels, row, strict=False)
            if predicted in shown
        )
        rows.append(f"<tr><th>{class_name(truth, rules)}</th>{cells}</tr>")
    return f'<table id="confusion"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def per_class(result: EvalResult, rules: Rules) -> str:
    auc = (result.get("probabilities") or {}).get("auc", {})
    rows = "".join(
        f"<tr><td>{class_name(c, rules)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f} {span(result['intervals']['f1'][c])}</td><td>{auc_cell(auc, c, result)}</td>"
        f"<td>{m['support']}</td></tr>"
        for c, m in result["per_class"].items()
    )
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1 (95% CI)</th><th>AUC</th><th>photos</th></tr>"
    return f'<table class="numbers">{head}{rows}</table>'


def auc_cell(auc: dict[str, float], c: str, result: EvalResult) -> str:
    """A class's AUC, or a dash that says why there is none."""
    if c in auc and auc[c] is not None:
        return score(auc[c])
    if not result.get("probabilities"):
        why = "no class probabilities in this run (the endpoint gave no logprobs, or --no-probabilities)"
    else:
        why = "AUC needs held-out photos of this class and of others, each with probabilities"
    return f'<span class="ci" title="{escape(why)}">&mdash; {escape(why)}</span>'


def calibrated(probabilities: dict[str, Any]) -> str:
    if "ece_if_calibrated" not in probabilities:
        return ""
    low, high = probabilities["ece_if_calibrated"]
    return f"a calibrated model scores {low:.3f}&ndash;{high:.3f} here"


def span(bounds: list[float]) -> str:
    return f'<span class="ci">{bounds[0]:.3f}&ndash;{bounds[1]:.3f}</span>'


def per_view(result: EvalResult) -> str:
    bounds = result["intervals"].get("per_view", {})
    rows = "".join(
        f"<tr><td>{escape(view)}</td><td>{acc:.3f} {span(bounds[view]) if view in bounds else ''}</td></tr>"
        for view, acc in result["per_view"].items()
    )
    return f'<table class="numbers"><tr><th>view</th><th>accuracy (95% CI)</th></tr>{rows}</table>'


def per_subgroup(result: EvalResult) -> str:
    """Each attribute from ingest --metadata: its groups' accuracy, too-small groups said so, the worst marked."""
    found = result.get("subgroups") or {}
    tables = []
    for attribute, figures in found.items():
        rows = "".join(
            f"<tr><td>{escape(value)}{' (worst)' if value == figures['worst'] else ''}</td><td>{f['n']}</td><td>"
            + ("too few photos to say anything" if f["too_small"] else f"{f['accuracy']:.3f} {span(f['interval'])}")
            + "</td></tr>"
            for value, f in figures["groups"].items()
        )
        tables.append(f'<h3>{escape(attribute)}</h3><table class="numbers"><tr><th>group</th><th>photos</th>'
                      f"<th>accuracy (95% CI)</th></tr>{rows}</table>")  # fmt: skip
    if not tables:
        return ""
    return ('<h2 id="subgroups">Subgroups</h2><p class="sub">The worst group is picked on these photos: its figure '
            "leans low.</p>" + "".join(tables))  # fmt: skip


def filters(result: EvalResult) -> str:
    shown = result.get("predicted_labels") or result["labels"]
    options = "".join(f'<option value="{escape(label)}">{escape(label)}</option>' for label in shown)
    return f"""<div class="filters">
<label>true <select id="filter-true"><option value="">all</option>{options}</select></label>
<label>predicted <select id="filter-pred"><option value="">all</option>{options}</select></label>
<label><input type="checkbox" id="errors-only" checked> errors only</label>
<span id="shown-count"></span> shown
</div>"""


def threshold(result: EvalResult) -> float | None:
    return (result.get("selective") or {}).get("threshold")


def referral(result: EvalResult) -> str:
    """The risk-coverage curve as an inline SVG, and the referral threshold for the target accuracy."""
    chosen = result.get("selective")
    if not chosen:
        return ""
    side = 240
    points = " ".join(
        f"{p['coverage'] * side:.1f},{(1 - p['accuracy']) * side:.1f}" for p in chosen["curve"]
    )  # accuracy up, coverage right
    svg = (
        f'<svg id="risk-coverage" width="{side + 40}" height="{side + 30}" viewBox="-30 -5 {side + 40} {side + 30}" '
        'role="img" aria-label="accuracy of the photos answered against the share answered">'
        f'<rect x="0" y="0" width="{side}" height="{side}" fill="none" stroke="#999"/>'
        f'<polyline points="{points}" fill="none" stroke="darkred" stroke-width="2"/>'
        f'<text x="{side / 2}" y="{side + 20}" text-anchor="middle" font-size="11">share answered</text>'
        f'<text x="-8" y="8" text-anchor="end" font-size="11">1</text>'
        f'<text x="-8" y="{side}" text-anchor="end" font-size="11">0</text></svg>'
    )
    target = f"{chosen['target_accuracy']:.0%}"
    if chosen["threshold"] is None:
        said = f"No referral threshold: {escape(chosen['why_none'])}."
    else:
        accuracy = (
            "-" if chosen["accuracy"] is None else f"{chosen['accuracy']:.3f} {span(chosen['accuracy_interval'])}"
        )
        said = (
            f"For {target} accuracy, answer when the top class's probability is at least "
            f'<b id="referral-threshold">{chosen["threshold"]:.3f}</b> (chosen on {chosen["chosen_on"]} photos); on '
            f'the other {chosen["measured_on"]}: coverage <b id="referral-coverage">{chosen["coverage"]:.3f}</b> '
            f"{span(chosen['coverage_interval'])}, accuracy {accuracy}. Photos below it are marked "
            "<i>referred</i> in the gallery."
        )
    return f'<h2>Referral</h2><p class="sub">{said} AURC {chosen["aurc"]:.3f}.</p>{svg}'


def figure(record: dict[str, Any], image: str, rules: Rules, refer_below: float | None = None) -> str:
    right = record["predicted"] == record["label"]
    probabilities = record.get("probabilities") or {}
    referred = refer_below is not None and bool(probabilities) and max(probabilities.values()) < refer_below
    marked = ' <b class="referred">referred</b>' if referred else ""
    bars = "".join(
        f'<div class="bar"><span>{escape(c)}</span><meter min="0" max="1" value="{p:.4f}"></meter>{p:.3f}</div>'
        for c, p in sorted(probabilities.items(), key=lambda kv: -kv[1])
    )
    error = f'<p class="error">request failed: {escape(record["error"])}</p>' if record.get("error") else ""
    return (
        f'<figure class="photo{" right" if right else ""}" data-true="{escape(record["label"])}" '
        f'data-pred="{escape(record["predicted"])}" data-id="{escape(record["id"])}">'
        f'<img src="{image}" alt="{escape(record["id"])}" width="{THUMBNAIL_SIDE}">'
        f"<figcaption><b>true</b> {class_name(record['label'], rules)} &middot; {escape(record['view'])}<br>"
        f'<b>predicted</b> <span class="predicted">{class_name(record["predicted"], rules)}</span>{marked}'
        f"{bars}{error}<details><summary>answer</summary><pre>{escape(record['raw'] or '')}</pre></details>"
        "</figcaption></figure>"
    )


STYLE = """
body { font-family: SkinvlmHangul, system-ui, "Noto Sans CJK KR", "Malgun Gothic", "Apple SD Gothic Neo", sans-serif;
       margin: 2rem; color: #1b1b1b; max-width: 1400px; }
pre, select, option, button, input, textarea { font-family: inherit; } /* their UA fonts skip the embedded Hangul */
h1 { margin-bottom: 0; } .sub { color: #555; margin-top: .2rem; } .referred { color: #b35c00; }
.note { border-left: 4px solid #b00020; background: #fff5f5; padding: .4rem .8rem; }
.cards { display: flex; flex-wrap: wrap; gap: 1rem; }
.cards div { border: 1px solid #ccc; border-radius: 6px; padding: .6rem 1rem; min-width: 8rem; }
.cards i { display: block; font-style: normal; color: #555; font-size: .85rem; }
.cards b { font-size: 1.6rem; } .ci { display: block; color: #555; font-size: .8rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } small { color: #666; }
.cell { width: 4.5rem; height: 2.4rem; border: 1px solid #bbb; cursor: pointer; font-size: 1rem; }
.cell.diagonal { font-weight: bold; } .cell.selected { outline: 3px solid #d95f02; }
.filters { margin: .5rem 0 1rem; display: flex; gap: 1rem; align-items: center; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: .8rem; }
.photo { border: 2px solid #c0392b; border-radius: 6px; margin: 0; padding: .5rem; display: flex; gap: .5rem; }
.photo.right { border-color: #27ae60; } .photo img { border-radius: 4px; align-self: flex-start; }
.photo[hidden] { display: none; } figcaption { font-size: .85rem; }
.bar { display: flex; align-items: center; gap: .3rem; font-size: .75rem; } .bar span { width: 3rem; }
.bar meter { width: 5rem; } pre { white-space: pre-wrap; font-size: .75rem; max-width: 32rem; }
.error { color: #c0392b; }
"""

SCRIPT = """
(function () {
  const byId = (id) => document.getElementById(id);
  const photos = Array.from(document.querySelectorAll('.photo'));
  function apply() {
    const truth = byId('filter-true').value, predicted = byId('filter-pred').value;
    const errorsOnly = byId('errors-only').checked;
    let shown = 0;
    for (const photo of photos) {
      const visible = (!truth || photo.dataset.true === truth) && (!predicted || photo.dataset.pred === predicted)
        && (!errorsOnly || photo.dataset.true !== photo.dataset.pred);
      photo.hidden = !visible;
      shown += visible ? 1 : 0;
    }
    byId('shown-count').textContent = String(shown);
    for (const cell of document.querySelectorAll('.cell')) {
      cell.classList.toggle('selected', cell.dataset.true === truth && cell.dataset.pred === predicted);
    }
  }
  for (const cell of document.querySelectorAll('.cell')) {
    cell.addEventListener('click', () => {
      byId('filter-true').value = cell.dataset.true;
      byId('filter-pred').value = cell.dataset.pred;
      byId('errors-only').checked = false;
      apply();
      byId('photos').scrollIntoView();
    });
  }
  for (const id of ['filter-true', 'filter-pred', 'errors-only']) byId(id).addEventListener('change', apply);
  apply();
})();
"""
