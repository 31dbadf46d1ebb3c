"""One self-contained HTML file: inline CSS, plots embedded as base64 PNG, a few lines of script to
sort the tables by a click on a header. No network fetch of any kind, so it opens anywhere.

The script sets ``data-ready="1"`` on <body> after it has run, so a test (or a person) can tell that
it ran to the end without error.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
from html import escape

from tunelab.report.tables import fmt_count, fmt_num, summary_cells, summary_headers

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
     padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem} .note{color:#555;font-size:.9rem;margin:.3rem 0}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0;min-width:50%}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:right;white-space:nowrap}
th{background:#f4f4f6;cursor:pointer;user-select:none} th:hover{background:#e8e8ee}
td:first-child,th:first-child,td.t{text-align:left}
tr:nth-child(even) td{background:#fafafa} tr.best td{background:#eef8ee}
.plots{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;flex:1 1 480px}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85rem;color:#555}
.scroll{overflow-x:auto;max-width:100%} td.wrap{white-space:normal;min-width:14rem;max-width:26rem;text-align:left} .verdict{font-weight:600;font-size:1rem} .warn{color:#a33} code{background:#f4f4f6;padding:0 .2rem}
"""

_JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''&&!isNaN(+v))return +v;
    return td.textContent.trim().toLowerCase();}
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('th').forEach(function(th,col){
      th.title='click to sort';
      th.addEventListener('click',function(){
        var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
        rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
          if(typeof x!==typeof y){x=String(x);y=String(y);}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def _td(text: str, value=None, cls: str = "") -> str:
    v = "" if value is None or isinstance(value, str) else f' data-v="{escape(str(value))}"'
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{v}>{escape(text)}</td>"


def _table(headers: list[str], body_rows: list[str], sortable: bool = True) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    cls = ' class="sortable"' if sortable else ""
    table = f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body_rows)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def inline_markdown(text: str) -> str:
    """One line of the Markdown the reports write, as HTML: escaped, with **bold** and `code` rendered
    (the report's notes are Markdown; shown escaped, the HTML read a literal "**Predicted winner**")."""
    out = escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A sortable table whose cells are all plain text: escaped, left-aligned, sorted as text.

    For tables whose cells are already formatted elsewhere (the advice's predictions); tables of
    numbers use ``summary_table`` / ``runs_table``, which sort by the raw values."""
    return _table(headers, [f"<tr>{''.join(_td(c, cls='t') for c in r)}</tr>" for r in rows])


def summary_table(summary: list[dict], metric: str, by: str = "label") -> str:
    rows = []
    for i, s in enumerate(summary):
        cells = summary_cells(s, metric, by)
        raw = [
            None,
            None,
            s[f"{metric}_mean"],
            s.get(f"{metric}_lo"),
            s.get(f"{metric}_std"),
            None,
            s.get("vs_best_diff"),
            s.get("trainable_params_mean"),
            s.get("trainable_percent_mean"),
            s.get("wall_time_s_mean"),
            s.get("train_tokens_per_s_mean"),
            s.get("peak_memory_mb_mean"),
            s.get("final_loss_mean"),
            s["seeds"],
            None,
        ]
        tds = "".join(
            _td(c, v, "t wrap" if j == len(cells) - 1 else "t" if j < 2 or j == 5 else "")
            for j, (c, v) in enumerate(zip(cells, raw, strict=True))
        )
        rows.append(f"<tr{' class=best' if i == 0 else ''}>{tds}</tr>")
    return _table(summary_headers(metric, by), rows)


def runs_table(rows: list[dict], columns: list[str]) -> str:
    cols = [c for c in columns if c != "run_dir"]
    body = []
    for r in rows:
        tds = []
        for c in cols:
            v = r.get(c)
            if c in ("trainable_params", "total_params") and v is not None:
                text = fmt_count(v)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                text = fmt_num(v)
            else:
                text = "–" if v is None else str(v)
            tds.append(_td(text, v, "t" if not isinstance(v, int | float) else ""))
        body.append(f"<tr>{''.join(tds)}</tr>")
    return _table(cols, body)


def _pct(v):
    return ("–", None) if v is None else (f"{100 * v:.2f}%", v)


def kv_table(title: str, items: dict) -> str:
    """A two-column table of facts (environment, budgets)."""
    body = [f"<tr>{_td(str(k), cls='t')}{_td(str(v), cls='t')}</tr>" for k, v in items.items() if v is not None]
    return f"<h2>{escape(title)}</h2>" + _table(["", ""], body, sortable=False) if body else ""


def figure(png: bytes | None, caption: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def scaling_section(result: dict, png: bytes | None) -> str:
    """Fitted parameters, held-out predictions and the fit plot of a ``fit_scaling`` result."""
    out = [
        f"<h2>Scaling law: {escape(result.get('target', 'loss'))} vs data size and "
        f"{escape(str(result.get('factor')))}</h2>"
    ]
    if result.get("note"):
        out.append(f'<p class="note">{escape(result["note"])}</p>')
    heads = [
        "group",
        "form",
        "formula",
        "A",
        "alpha",
        "beta",
        "B",
        "E",
        "fitted points",
        "held-out mean rel. error",
        "held-out max rel. error",
        "constant baseline",
        "verdict",
    ]
    body, held, warns = [], [], []
    for f in result.get("fits", []):
        group = str(f.get("group") or "all")
        if "params" not in f:
            body.append(
                f"<tr>{_td(group, cls='t')}{_td(f['form'], cls='t')}"
                f'<td class="t warn" colspan="11">{escape(f.get("error", "not fitted"))}</td></tr>'
            )
            continue
        p, e, diag = f["params"], f["errors"], f.get("diagnostics") or {}
        vals = [p.get("A"), p.get("alpha"), p.get("beta"), p.get("B"), p["E"]]
        body.append(
            "<tr>"
            + _td(group, cls="t")
            + _td(f["form"], cls="t")
            + _td(f["formula"], cls="t")
            + "".join(_td(fmt_num(v), v) for v in vals)
            + _td(str(f["n_points"]), f["n_points"])
            + _td(f"{100 * e['mean_rel_error']:.2f}%", e["mean_rel_error"])
            + _td(f"{100 * e['max_rel_error']:.2f}%", e["max_rel_error"])
            + _td(*_pct(f.get("baseline_errors", {}).get("mean_rel_error")))
            + _td("good" if diag.get("good") else "NOT a good fit", cls="t" if diag.get("good") else "t warn")
            + "</tr>"
        )
        warns += [f"{group} / {f['form']}: {w}" for w in diag.get("warnings", [])]
        for h in f["heldout"]:
            held.append(
                "<tr>"
                + _td(group, cls="t")
                + _td(f["form"], cls="t")
                + _td(fmt_num(h["x"]) if h["x"] is not None else "–", h["x"])
                + _td(fmt_num(h["d"]), h["d"])
                + _td(fmt_num(h["actual"]), h["actual"])
                + _td(fmt_num(h["predicted"]), h["predicted"])
                + _td(f"{100 * h['rel_error']:.2f}%", h["rel_error"])
                + "</tr>"
            )
    out.append(_table(heads, body))
    out += [f'<p class="warn">{escape(w)}</p>' for w in warns]
    out.append('<p class="note">The largest data size(s) are held out of each fit and predicted; the '
               "constant baseline predicts them with the mean of the fitted points' losses.</p>")
    out.append(_table(["group", "form", "X", "D", "actual", "predicted", "rel. error"], held))
    out.append(f'<div class="plots">{figure(png, "fit (lines) against the runs (points)")}</div>')
    return "\n".join(out)


def render(
    *,
    title: str,
    metric: str,
    summary: list[dict],
    rows: list[dict],
    columns: list[str],
    plots: list[tuple[bytes | None, str]],
    by: str = "label",
    meta: dict | None = None,
    unfinished: list[str] = (),
    failed: dict[str, str] | None = None,
    extra_html: str = "",
    notes: list[str] = (),
    lead: list[str] = (),
) -> str:
    """The whole report page as a string."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta_txt = " · ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in (meta or {}).items() if v is not None)
    parts = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{meta_txt}{" · " if meta_txt else ""}generated {when} · ranked by '
        f"<code>{escape(metric)}</code> (mean over seeds, 95% CI)</p>",
        *(f'<p class="{"verdict" if x.startswith("Verdict") else "warn"}">{escape(x)}</p>' for x in lead),
        "<h2>Summary</h2>",
        summary_table(summary, metric, by),
        *(f'<p class="note">{escape(n)}</p>' for n in notes),
    ]
    if unfinished:
        parts.append(f'<p class="warn">Unfinished (no metrics.json): {escape(", ".join(unfinished))}</p>')
    for run, err in (failed or {}).items():
        parts.append(f'<p class="warn">Failed: <code>{escape(run)}</code>: {escape(err)}</p>')
    figs = "".join(figure(png, cap) for png, cap in plots)
    if figs:
        parts += ["<h2>Plots</h2>", f'<div class="plots">{figs}</div>']
    parts += [extra_html, "<h2>All runs</h2>", runs_table(rows, columns)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{_CSS}</style></head>\n'
        f"<body>\n{chr(10).join(parts)}\n<script>{_JS}</script>\n</body></html>\n"
    )
