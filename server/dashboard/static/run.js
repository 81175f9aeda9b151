/* One run: polls /api/runs/{id} every 1.5 s; when anything changed, fetches the views and redraws
   in place (charts with Plotly.react, tables rebuilt, new events appended). */
"use strict";

(() => {
  const { api, el, num, clock, ago, poll } = medfed;
  const runId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const base = `/api/runs/${encodeURIComponent(runId)}`;
  const METRICS = [
    ["auc", "AUC"], ["accuracy", "Accuracy"], ["dice", "Dice"], ["loss", "Loss"],
  ];
  const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  let lastKey = null;
  let lastEventId = 0;
  let lastRun = null;

  document.getElementById("run-id").textContent = runId;
  document.getElementById("report-link").href = `/runs/${encodeURIComponent(runId)}/report`;
  document.title = `medfed dashboard: ${runId}`;

  function setText(id, text) { document.getElementById(id).textContent = text; }

  function layout(title, yTitle, extra) {
    return Object.assign({
      title: { text: title, font: { size: 13 } },
      height: 260,
      margin: { l: 50, r: 16, t: 36, b: 40 },
      xaxis: { title: { text: "round" }, dtick: 1, rangemode: "tozero" },
      yaxis: { title: { text: yTitle }, zeroline: false },
      showlegend: false,
      paper_bgcolor: "#fff",
      plot_bgcolor: "#fff",
    }, extra || {});
  }

  // ------------------------------------------------------------------ global metric curves
  function renderCharts(rounds) {
    const finished = rounds.filter((r) => r.status === "finished");
    const server = finished.some((r) => Object.keys(r.global_metrics).length > 0);
    const source = (r) => (server ? r.global_metrics : r.eval_metrics);
    setText("metrics-source", server
      ? "The server's evaluation of the aggregated model on the held-out test split, after each round (dashed: the initial model)."
      : "No server-side test set (deployment): the sites' validation metrics, weighted by examples, after each round.");
    const container = document.getElementById("charts");
    const points = finished.filter((r) => r.round > 0);
    const initial = finished.find((r) => r.round === 0);
    let primary = null;
    const series = [];
    let changed = false;
    for (const [key, label] of METRICS) {
      const xs = [], ys = [];
      for (const r of points) {
        const value = source(r)[key];
        if (value !== undefined) { xs.push(r.round); ys.push(value); }
      }
      const id = `chart-${key}`;
      let div = document.getElementById(id);
      if (xs.length === 0) { if (div) { div.remove(); changed = true; } continue; }
      if (!primary && key !== "loss") primary = [key, label, ys[ys.length - 1], xs[xs.length - 1]];
      if (!div) {
        div = el("div", { id, class: "chart metric-chart", "data-metric": key });
        container.append(div);
        changed = true;
      }
      series.push([div, key, label, xs, ys]);
    }
    // All chart boxes exist before drawing, so each is drawn at its final width in the grid.
    for (const [div, key, label, xs, ys] of series) {
      div.dataset.points = String(xs.length);
      const shapes = [];
      const base0 = initial ? source(initial)[key] : undefined;
      if (base0 !== undefined) {
        shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: base0, y1: base0,
          line: { dash: "dash", width: 1, color: "#94a3b8" } });
      }
      const trace = { x: xs, y: ys, mode: "lines+markers", name: label, marker: { size: 8 },
        line: { color: key === "loss" ? "#b45309" : "#2563eb" },
        hovertemplate: `round %{x}<br>${label} %{y:.4f}<extra></extra>` };
      Plotly.react(div, [trace], layout(`${label} vs round`, label, { shapes }), PLOT_CONFIG);
      if (changed) Plotly.Plots.resize(div);
    }
    if (!primary) {
      const lossChart = points.length && source(points[points.length - 1]).loss;
      if (lossChart !== undefined && points.length) primary = ["loss", "Loss", lossChart, points[points.length - 1].round];
    }
    if (primary) {
      setText("primary-name", primary[1]);
      setText("primary-value", num(primary[2]));
      setText("primary-sub", `after round ${primary[3]}`);
    }
  }

  // ------------------------------------------------------------------ progress
  function renderProgress(run, rounds) {
    const status = document.getElementById("run-status");
    status.textContent = run.status;
    status.className = `badge ${run.status}`;
    setText("round-counter", String(run.rounds_done));
    setText("round-total", String(run.planned_rounds));
    const pct = run.planned_rounds ? Math.min(100, (100 * run.rounds_done) / run.planned_rounds) : 0;
    document.getElementById("progress-fill").style.width = `${pct}%`;
    const current = rounds.find((r) => r.round === run.current_round);
    let sub = "";
    if (run.status === "running" && current && current.status === "running") sub = `round ${current.round} in progress`;
    else if (run.status === "finished") sub = "finished";
    else if (run.status === "failed") sub = "failed";
    else if (run.status === "stale") sub = "no update for 15 min: the server may have stopped";
    setText("round-sub", sub);
    const last = [...rounds].reverse().find((r) => r.status === "finished" && r.round > 0);
    if (last) {
      setText("sites-responding", last.selected != null ? `${last.responded} / ${last.selected}` : String(last.responded));
      setText("sites-sub", last.failures ? `${last.failures} failed in round ${last.round}` : `round ${last.round}`);
    }
    setText("last-update", ago(run.last_update));
    setText("started-at", `started ${clock(run.started)}`);
    const error = document.getElementById("run-error");
    error.hidden = !run.error;
    error.textContent = run.error ? `Run failed: ${run.error}` : "";
  }

  // ------------------------------------------------------------------ sites
  function metricsCell(metrics) {
    const parts = [];
    for (const [key, label] of METRICS) {
      if (metrics[key] !== undefined) parts.push(el("span", { class: "metric" }, [el("b", {}, `${label} `), num(metrics[key])]));
    }
    return parts.length ? parts : ["–"];
  }

  function epsilonCell(site) {
    if (site.epsilon === null || site.epsilon === undefined) return el("span", { class: "note" }, "DP off");
    const budget = site.budget_epsilon;
    const ratio = budget ? site.epsilon / budget : 0;
    const fill = el("div", { class: `eps-fill${ratio >= 1 ? " over" : ratio >= 0.8 ? " high" : ""}` });
    fill.style.width = `${Math.min(100, ratio * 100).toFixed(1)}%`;
    const bar = el("div", {
      class: "eps-bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(budget ?? ""),
      "aria-valuenow": String(site.epsilon), "data-ratio": ratio.toFixed(4),
      title: `ε spent ${num(site.epsilon)} of a budget of ${budget != null ? num(budget) : "?"}`,
    }, fill);
    const label = budget != null ? `${num(site.epsilon, 2)} / ${num(budget, 2)}` : num(site.epsilon, 2);
    return el("div", { class: "eps" }, [bar, el("span", { class: "num" }, label)]);
  }

  function renderSites(sites) {
    const body = document.querySelector("#sites-table tbody");
    body.replaceChildren(...sites.map((s) => el("tr", { class: "site-row", "data-site": s.site }, [
      el("td", {}, s.site),
      el("td", { title: clock(s.last_seen) }, `round ${s.last_round}, ${ago(s.last_seen)}`),
      el("td", { class: "num" }, num(s.num_examples, 0)),
      el("td", {}, metricsCell(s.local_metrics)),
      el("td", {}, epsilonCell(s)),
      el("td", { class: `num${s.rounds_declined ? " warn" : ""}` }, String(s.rounds_declined)),
      el("td", { class: `num${s.rounds_refused ? " warn" : ""}` }, String(s.rounds_refused || 0)),
      el("td", { class: `num${s.rounds_missed ? " warn" : ""}` }, String(s.rounds_missed)),
    ])));
    document.getElementById("sites-empty").hidden = sites.length > 0;
  }

  // ------------------------------------------------------------------ fairness
  function renderFairness(fair) {
    const div = document.getElementById("chart-fairness");
    const pts = fair.rounds.filter((p) => p.round > 0);
    if (!fair.metric || pts.length === 0) {
      setText("fairness-note", "Appears once sites report validation metrics.");
      return;
    }
    const better = fair.higher_is_better ? "higher" : "lower";
    setText("fairness-note", `Sites' own validation ${fair.metric} (${better} is better): the best and the worst site each round, and the gap between them.`);
    const xs = pts.map((p) => p.round);
    const worst = { x: xs, y: pts.map((p) => p.worst), mode: "lines+markers", name: "worst site",
      line: { color: "#b91c1c" }, text: pts.map((p) => p.worst_site),
      hovertemplate: "round %{x}: %{y:.4f} (%{text})<extra>worst</extra>" };
    const best = { x: xs, y: pts.map((p) => p.best), mode: "lines+markers", name: "best site",
      line: { color: "#15803d" }, fill: "tonexty", fillcolor: "rgba(148,163,184,0.25)", text: pts.map((p) => p.best_site),
      hovertemplate: "round %{x}: %{y:.4f} (%{text})<extra>best</extra>" };
    Plotly.react(div, [worst, best], layout(`${fair.metric}: best vs worst site`, fair.metric,
      { showlegend: true, legend: { orientation: "h", y: -0.25 } }), PLOT_CONFIG);
    const last = pts[pts.length - 1];
    setText("fairness-gap", num(last.gap));
    setText("fairness-sub", `${fair.metric}, round ${last.round}: ${last.best_site} vs ${last.worst_site}`);
  }

  // ------------------------------------------------------------------ cross-site evaluation
  const CROSS_METRICS = [
    ["auc", "AUC"], ["accuracy", "Accuracy"], ["balanced-accuracy", "Bal. acc."], ["sensitivity", "Sens."],
    ["specificity", "Spec."], ["threshold", "Threshold"], ["dice", "Dice"],
  ];

  function crossCell(metrics) {
    const parts = [];
    for (const [key, label] of CROSS_METRICS) {
      if (metrics[key] !== undefined) parts.push(el("span", { class: "metric" }, [el("b", {}, `${label} `), num(metrics[key])]));
    }
    return parts.length ? parts : ["–"];
  }

  function renderCrossSite(report) {
    const table = document.getElementById("cross-site-table");
    const gapsTable = document.getElementById("cross-site-gaps");
    if (!report) {
      table.hidden = true;
      gapsTable.hidden = true;
      return;
    }
    const suppressed = report.sites.reduce((sum, s) => sum + s.suppressed, 0);
    setText("cross-site-note", `The ${report.checkpoint} model (round ${report.round}) on each site's own local test split. ` +
      `Subgroups with fewer than ${report.min_count} images are not reported (${suppressed} left out).`);
    const rows = [];
    for (const s of report.sites) {
      rows.push(el("tr", { class: "cross-site-row", "data-site": s.site }, [
        el("td", {}, s.site), el("td", {}, "all"), el("td", { class: "num" }, String(s.n)), el("td", {}, crossCell(s.metrics)),
      ]));
      for (const g of s.subgroups) {
        rows.push(el("tr", { class: "cross-site-subgroup", "data-site": s.site, "data-key": g.key }, [
          el("td", {}, ""), el("td", {}, `${g.key} = ${g.value}`), el("td", { class: "num" }, String(g.n)), el("td", {}, crossCell(g.metrics)),
        ]));
      }
    }
    table.querySelector("tbody").replaceChildren(...rows);
    table.hidden = false;
    gapsTable.querySelector("tbody").replaceChildren(...report.gaps.map((g) => el("tr", { class: "cross-site-gap" }, [
      el("td", {}, g.key), el("td", {}, g.metric),
      el("td", {}, `${g.best_value} (${num(g.best)})`), el("td", {}, `${g.worst_value} (${num(g.worst)})`),
      el("td", { class: "num" }, num(g.gap)),
    ])));
    gapsTable.hidden = report.gaps.length === 0;
  }

  // ------------------------------------------------------------------ SecAgg+
  function renderSecagg(rows) {
    const on = rows.filter((r) => r.enabled);
    const body = document.querySelector("#secagg-table tbody");
    document.getElementById("secagg-table").hidden = on.length === 0;
    if (on.length === 0) {
      setText("secagg-status", rows.length ? "off" : "–");
      setText("secagg-sub", rows.length ? "updates aggregated in the clear" : "");
      setText("secagg-note", rows.length
        ? "SecAgg+ is off for this run: the server sees each site's update."
        : "Appears after the first round.");
      body.replaceChildren();
      return;
    }
    const failed = on.filter((r) => !r.secagg.completed).map((r) => r.round);
    const dropped = on.reduce((sum, r) => sum + (r.secagg.dropped || 0), 0);
    const status = document.getElementById("secagg-status");
    status.textContent = failed.length ? "failed" : "held";
    status.className = `value ${failed.length ? "bad" : "ok"}`;
    setText("secagg-sub", failed.length
      ? `failed in round ${failed.join(", ")}`
      : `${on.length} round(s), ${dropped} dropout(s)`);
    setText("secagg-note", "SecAgg+ (Flower): the server only sees the sum of the masked updates. Per round: sites sampled, those whose masked vectors made it into the aggregate, and the stage a failure happened in.");
    body.replaceChildren(...on.map((r) => el("tr", { class: `secagg-row ${r.secagg.completed ? "" : "level-error"}` }, [
      el("td", { class: "num" }, String(r.round)),
      el("td", { class: r.secagg.completed ? "ok" : "bad" }, r.secagg.completed ? "completed" : "failed"),
      el("td", { class: "num" }, num(r.secagg.sampled, 0)),
      el("td", { class: "num" }, num(r.secagg.survivors, 0)),
      el("td", { class: `num${r.secagg.dropped ? " warn" : ""}` }, num(r.secagg.dropped, 0)),
      el("td", {}, r.secagg.failed_stage || "–"),
      el("td", { class: "num" }, num(r.secagg.seconds, 2)),
    ])));
  }

  // ------------------------------------------------------------------ events and config
  function renderEvents(events) {
    const body = document.querySelector("#events-table tbody");
    for (const e of events) {
      lastEventId = Math.max(lastEventId, e.id);
      body.prepend(el("tr", { class: `event-row level-${e.level}`, "data-kind": e.kind }, [
        el("td", {}, clock(e.time)),
        el("td", {}, e.level),
        el("td", { class: "num" }, e.round ?? ""),
        el("td", {}, e.message),
      ]));
    }
    while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
  }

  function renderConfig(run) {
    const body = document.querySelector("#config-table tbody");
    const keys = Object.keys(run.config).sort();
    body.replaceChildren(...keys.map((k) => el("tr", {}, [el("td", {}, k), el("td", {}, String(run.config[k]))])));
    const versions = Object.entries(run.versions || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    setText("versions", versions ? `Versions: ${versions}. Mode: ${run.mode}.` : `Mode: ${run.mode}.`);
  }

  // ------------------------------------------------------------------ loop
  poll(async () => {
    const run = await api(base);
    setText("last-update", ago(run.last_update));
    const key = [run.status, run.last_update, run.last_event_id, run.rounds_done, run.current_round].join("|");
    if (key === lastKey) return;
    const [rounds, sites, fairness, secagg, events, crossSite] = await Promise.all([
      api(`${base}/rounds`), api(`${base}/sites`), api(`${base}/fairness`), api(`${base}/secagg`),
      api(`${base}/events?after=${lastEventId}`), api(`${base}/cross-site`),
    ]);
    renderProgress(run, rounds);
    renderCharts(rounds);
    renderSites(sites);
    renderFairness(fairness);
    renderSecagg(secagg);
    renderCrossSite(crossSite);
    renderEvents(events);
    if (!lastRun) renderConfig(run);
    lastRun = run;
    // Long logs arrive 500 events a poll: keep fetching until the page has caught up.
    lastKey = lastEventId >= run.last_event_id ? key : null;
    document.body.dataset.rendered = String(run.rounds_done);
  }, 1500);
})();
