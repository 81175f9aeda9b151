/* Shared helpers of the medfed dashboard pages (no framework; the pages poll the JSON API). */
"use strict";

const medfed = (() => {
  async function api(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      throw new Error("not signed in: open the URL printed by `medfed dashboard` (it carries the token).");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(`${path}: ${response.status} ${detail}`);
    }
    return response.json();
  }

  /** el("td", {class: "num"}, "text" | Node | [children]) — text only, never HTML. */
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of [].concat(children === undefined ? [] : children)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function num(value, digits = 3) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits);
  }

  function clock(unix) {
    if (!unix) return "–";
    return new Date(unix * 1000).toLocaleString(undefined, { hour12: false });
  }

  function ago(unix) {
    if (!unix) return "–";
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} d ago`;
  }

  function banner(message) {
    const node = document.getElementById("banner");
    const live = document.getElementById("live-indicator");
    if (message) {
      node.textContent = message;
      node.hidden = false;
      if (live) { live.textContent = "not updating"; live.classList.add("stalled"); }
    } else {
      node.hidden = true;
      if (live) { live.textContent = "live"; live.classList.remove("stalled"); }
    }
  }

  /** Call step() now and then every `ms` milliseconds, never overlapping. */
  function poll(step, ms) {
    async function tick() {
      try { await step(); banner(null); } catch (err) { banner(String(err.message || err)); }
      setTimeout(tick, ms);
    }
    tick();
  }

  return { api, el, num, clock, ago, banner, poll };
})();
