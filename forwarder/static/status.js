// The forwarder's live status page: plain DOM and a canvas chart, no library.
// Every value from the server is put in the page with textContent (log messages are
// client-controlled text), never as HTML.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const PALETTE = ["#2f6fdf", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285",
                   "#e67700", "#5f3dc4", "#5c940d", "#495057"];
  const colors = new Map();

  // A token given as /#token=... is kept for this tab and removed from the address bar.
  function readToken() {
    const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
    if (match) {
      const token = decodeURIComponent(match[1]);
      try { window.sessionStorage.setItem("forwarder-token", token); } catch (e) { /* private mode */ }
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
      return token;
    }
    try { return window.sessionStorage.getItem("forwarder-token"); } catch (e) { return null; }
  }
  const token = readToken();

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function colorOf(service) {
    if (!colors.has(service)) colors.set(service, PALETTE[colors.size % PALETTE.length]);
    return colors.get(service);
  }

  async function getJson(path) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    const response = await fetch(path, { headers: headers, cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    return { status: response.status, body: body };
  }

  function timeText(iso) {
    const d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function showNotice(text) {
    const notice = $("notice");
    if (text) { notice.textContent = text; notice.hidden = false; }
    else { notice.hidden = true; }
  }

  // --- health ---------------------------------------------------------------------

  function renderHealth(result) {
    const chip = $("forwarder-health");
    const list = $("components");
    clear(list);
    if (!result.body || !result.body.components) {
      chip.className = "chip chip-unknown";
      chip.textContent = "forwarder: unknown";
      return;
    }
    const healthy = result.status === 200;
    chip.className = "chip " + (healthy ? "chip-ok" : "chip-bad");
    chip.textContent = "forwarder: " + (healthy ? "healthy" : "unhealthy");
    const components = result.body.components;
    Object.keys(components).sort().forEach(function (name) {
      const c = components[name] || {};
      const li = el("li");
      const left = el("span", null, name);
      const state = String(c.state);
      const right = el("span", "chip " + (state === "ok" ? "chip-ok" :
        (state === "degraded" || state === "starting") ? "chip-warn" : "chip-bad"), state);
      li.appendChild(left);
      if (c.reason) li.appendChild(el("span", "meta", c.reason));
      li.appendChild(right);
      list.appendChild(li);
    });
  }

  // --- summary: badge, cards, chart -------------------------------------------------

  function renderBadge(summary) {
    const badge = $("critical-badge");
    const n = summary.critical_errors || 0;
    $("critical-count").textContent = String(n);
    badge.className = "badge " + (n > 0 ? "badge-bad" : "badge-ok");
  }

  function firingServices(alarms) {
    const names = new Set();
    (alarms || []).forEach(function (a) {
      if (a.group) names.add(String(a.group));
    });
    return names;
  }

  function renderCards(summary) {
    const box = $("service-cards");
    clear(box);
    const services = summary.services || {};
    const names = new Set(Object.keys(services));
    const series = (summary.series && summary.series.services) || {};
    Object.keys(series).forEach(function (s) { names.add(s); });
    if (names.size === 0) {
      box.appendChild(el("p", "empty", "No log lines in the last hour."));
      return;
    }
    const alarmed = firingServices(summary.alarms_firing);
    Array.from(names).sort().forEach(function (name) {
      const counts = services[name] || { INFO: 0, WARNING: 0, ERROR: 0, total: 0 };
      let level = "ok";
      let label = "healthy";
      if ((counts.ERROR || 0) > 0 || alarmed.has(name)) { level = "bad"; label = "errors"; }
      else if ((counts.WARNING || 0) > 0) { level = "warn"; label = "warnings"; }
      else if (!counts.total) { level = "warn"; label = "quiet for 15 min"; }
      const card = el("article", "card " + level);
      card.appendChild(el("h3", null, name));
      card.appendChild(el("div", "state", label));
      const dl = el("dl");
      [["errors", counts.ERROR || 0], ["warnings", counts.WARNING || 0],
       ["info", counts.INFO || 0], ["lines", counts.total || 0]].forEach(function (pair) {
        dl.appendChild(el("dt", null, pair[0]));
        dl.appendChild(el("dd", null, pair[1]));
      });
      card.appendChild(dl);
      box.appendChild(card);
    });
  }

  // As many decimals as the tick step needs (0.025 stays 0.025, not 0.03).
function tickLabel(value, step) {
  if (step >= 10) return value.toFixed(0);
  const decimals = Math.min(4, Math.max(0, Math.ceil(-Math.log10(step)) + 2));
  return Number(value.toFixed(decimals)).toString();
}

function niceMax(value) {
    if (value <= 0) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    const f = value / exp;
    const nice = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
    return nice * exp;
  }

  function renderChart(series) {
    const canvas = $("rate-chart");
    const legend = $("chart-legend");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 960;
    const height = canvas.clientHeight || 260;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    clear(legend);

    const pad = { left: 52, right: 12, top: 10, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const services = (series && series.services) || {};
    const names = Object.keys(services).sort();
    const points = (series && series.points) || 60;
    let max = 0;
    names.forEach(function (n) { services[n].forEach(function (v) { if (v > max) max = v; }); });
    const top = niceMax(max);

    ctx.font = "12px system-ui, sans-serif";
    ctx.strokeStyle = "#dde1e6";
    ctx.fillStyle = "#66707c";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = pad.top + plotH - (plotH * i) / 4;
      ctx.beginPath();
      ctx.moveTo(pad.left, y);
      ctx.lineTo(pad.left + plotW, y);
      ctx.stroke();
      const v = (top * i) / 4;
      ctx.fillText(tickLabel(v, top / 4), pad.left - 6, y);
    }
    if (series && series.start) {
      const start = new Date(series.start).getTime();
      const bucketMs = (series.bucket_s || 60) * 1000;
      ctx.textBaseline = "top";
      const step = Math.max(1, Math.round(points / 4));
      for (let i = 0; i <= points; i += step) {
        const x = pad.left + (plotW * i) / points;
        ctx.textAlign = i === 0 ? "left" : i + step > points ? "right" : "center";
        const t = new Date(start + i * bucketMs);
        ctx.fillText(t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
                     x, pad.top + plotH + 6);
      }
    }
    if (names.length === 0) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no lines in the last hour", pad.left + plotW / 2, pad.top + plotH / 2);
      return;
    }
    names.forEach(function (name) {
      const values = services[name];
      ctx.strokeStyle = colorOf(name);
      ctx.lineWidth = 2;
      ctx.beginPath();
      values.forEach(function (v, i) {
        const x = pad.left + (plotW * (i + 0.5)) / values.length;
        const y = pad.top + plotH - (plotH * v) / top;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
      const li = el("li");
      const swatch = el("span", "swatch");
      swatch.style.background = colorOf(name);
      li.appendChild(swatch);
      const last = values.length ? values[values.length - 1] : 0;
      li.appendChild(el("span", null, name + " (" + last.toFixed(2) + "/s last minute)"));
      legend.appendChild(li);
    });
  }

  // --- alarms and errors --------------------------------------------------------------

  function renderAlarms(result) {
    const list = $("alarms");
    clear(list);
    const firing = (result.body && result.body.firing) || [];
    if (firing.length === 0) {
      list.appendChild(el("li", "empty", "None firing."));
      return;
    }
    firing.forEach(function (a) {
      const li = el("li", "firing");
      li.appendChild(el("div", "rule", a.rule + (a.group ? " [" + a.group + "]" : "")));
      const since = a.started_at ? "since " + timeText(a.started_at) : "";
      li.appendChild(el("div", "meta",
        [a.severity || "", "count " + a.count, since].filter(Boolean).join(" · ")));
      if (a.samples && a.samples.length) li.appendChild(el("div", "meta", a.samples[0]));
      list.appendChild(li);
    });
  }

  function renderErrors(result) {
    const body = $("errors");
    clear(body);
    const rows = (result.body && result.body.rows) || [];
    if (rows.length === 0) {
      const tr = el("tr");
      const td = el("td", "empty", "No errors in the last hour.");
      td.colSpan = 4;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    rows.forEach(function (r) {
      const tr = el("tr");
      tr.appendChild(el("td", "when", timeText(r.ts)));
      tr.appendChild(el("td", null, r.service));
      tr.appendChild(el("td", null, r.event));
      const message = String(r.message || "");
      tr.appendChild(el("td", "msg", message.length > 600 ? message.slice(0, 600) + "…" : message));
      body.appendChild(tr);
    });
  }

  // --- the loop -------------------------------------------------------------------------

  async function refresh() {
    try {
      const results = await Promise.all([
        getJson("health"),
        getJson("summary?window=15m&series=1h&bucket=60s"),
        getJson("alerts"),
        getJson("logs/recent?level=ERROR&since=1h&limit=20"),
      ]);
      const [health, summary, alerts, errors] = results;
      renderHealth(health);
      if (results.some(function (r) { return r.status === 401; })) {
        showNotice("A token is required: open this page as /#token=YOUR_TOKEN.");
        return;
      }
      if (summary.status !== 200 || !summary.body) {
        showNotice("Summary unavailable: " + ((summary.body && summary.body.error) ||
                   "HTTP " + summary.status));
      } else {
        showNotice(null);
        renderBadge(summary.body);
        renderCards(summary.body);
        renderChart(summary.body.series);
      }
      if (alerts.status === 200) renderAlarms(alerts);
      if (errors.status === 200) renderErrors(errors);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (e) {
      showNotice("The forwarder does not answer (" + e + "); retrying.");
    }
  }

  function loop() {
    refresh().finally(function () { window.setTimeout(loop, REFRESH_MS); });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", loop);
  else loop();
})();
