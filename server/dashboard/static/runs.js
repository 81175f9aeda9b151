/* Runs list: polls /api/runs every 2 s. */
"use strict";

(() => {
  const { api, el, clock, ago, poll } = medfed;
  const body = document.querySelector("#runs-table tbody");

  function row(run) {
    const link = el("a", { href: `/runs/${encodeURIComponent(run.id)}` }, run.id);
    const rounds = run.mode === "pooled"
      ? `${run.rounds_done} / ${run.planned_rounds} (pooled epochs)`
      : `${run.rounds_done} / ${run.planned_rounds}`;
    return el("tr", { class: "run-row", "data-run": run.id }, [
      el("td", {}, link),
      el("td", {}, el("span", { class: `badge ${run.status}` }, run.status)),
      el("td", {}, run.mode),
      el("td", {}, run.model || "–"),
      el("td", {}, run.dataset || "–"),
      el("td", { class: "num" }, run.num_sites ?? "–"),
      el("td", { class: "num" }, rounds),
      el("td", {}, clock(run.started)),
      el("td", {}, ago(run.last_update)),
      el("td", {}, el("a", { class: "report-link", href: `/runs/${encodeURIComponent(run.id)}/report` }, "model card")),
    ]);
  }

  poll(async () => {
    const runs = await api("/api/runs");
    body.replaceChildren(...runs.map(row));
    document.getElementById("runs-empty").hidden = runs.length > 0;
  }, 2000);
})();
