// The console's pages: Edge Hosts (a live table fed by /console/events, Server-Sent
// Events), one host and the fleet runs (the JSON API with the session cookie), one run
// (fed by /console/runs/{id}/events). Which one runs is <body data-page>.
"use strict";

const STATUS_ORDER = ["Connected", "Unhealthy", "Disconnected", "Revoked"];
let source = null;
let latest = null;
let cursors = [""];  // the "after" cursor of each page shown so far; the last is this page's
let selectorShown = "";

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

function relative(iso, now) {
  if (!iso) return "never";
  const secs = Math.round((now - Date.parse(iso)) / 1000);
  if (secs < 5) return "just now";
  if (secs < 60) return `${secs}s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m ago`;
  if (secs < 86400) return `${Math.floor(secs / 3600)}h ago`;
  return `${Math.floor(secs / 86400)}d ago`;
}

function heartbeatCell(host, now) {
  const iso = host.last_heartbeat_at;
  if (!iso) return el("td", { textContent: "never" });
  const time = el("time", { dateTime: iso, title: iso, textContent: relative(iso, now) });
  return el("td", {}, time, el("span", { className: "visually-hidden", textContent: ` (${iso})` }));
}

function row(host, now) {
  const caps = host.capabilities;
  const status = host.status;
  const pill = el("span", { className: `pill pill-${status.toLowerCase()}`, textContent: status });
  const labels = Object.entries(caps.labels).map(([k, v]) => `${k}=${v}`).join(", ");
  const link = el("a", { href: `/hosts/${encodeURIComponent(host.node_id)}`, textContent: host.node_id });
  const tr = el("tr", {},
    el("td", { className: "mono" }, link),
    el("td", { textContent: caps.hostname || "-" }),
    el("td", { textContent: host.tenant_id }),
    el("td", {}, pill),
    heartbeatCell(host, now),
    el("td", { textContent: [caps.os, caps.arch].filter(Boolean).join("/") || "-" }),
    el("td", { textContent: caps.tools.join(", ") || "-" }),
    el("td", { textContent: labels || "-" }),
    el("td", { textContent: caps.tags.join(", ") || "-" }),
  );
  tr.dataset.nodeId = host.node_id;
  tr.dataset.status = status;
  return tr;
}

function render() {
  if (!latest) return;
  const now = Date.now();
  const body = document.querySelector("#hosts tbody");
  body.replaceChildren(...latest.hosts.map((h) => row(h, now)));
  const counts = STATUS_ORDER.filter((s) => latest.status_counts[s])
    .map((s) => `${latest.status_counts[s]} ${s}`).join(", ");
  const total = latest.matched;
  const paged = latest.hosts.length < total;
  const first = paged ? hostsBefore() + 1 : 1;
  const shown = paged ? ` (${first}–${first + latest.hosts.length - 1} shown)` : "";
  const summary = document.getElementById("summary");
  const text = `${total} host${total === 1 ? "" : "s"}${counts ? ": " + counts : ""}${shown}`;
  if (summary.textContent !== text) summary.textContent = text;  // announced only on change
  document.getElementById("prev-page").disabled = cursors.length < 2;
  document.getElementById("next-page").disabled = !latest.next_cursor;
  if (!window.firstHostsPaint) {
    window.firstHostsPaint = performance.now();  // read by benchmarks/console_first_paint.py
  }
}

function hostsBefore() {
  return (cursors.length - 1) * (latest.pageSize || latest.hosts.length);
}

function listen(selector) {
  if (source) source.close();
  selectorShown = selector;
  document.getElementById("selector-error").textContent = "";
  const params = new URLSearchParams();
  if (selector) params.set("selector", selector);
  const after = cursors[cursors.length - 1];
  if (after) params.set("after", after);
  const query = params.toString() ? `?${params}` : "";
  source = new EventSource(`/console/events${query}`);
  source.addEventListener("hosts", (ev) => {
    const pageSize = latest ? latest.pageSize : 0;
    latest = JSON.parse(ev.data);
    latest.pageSize = Math.max(pageSize || 0, latest.next_cursor ? latest.hosts.length : 0);
    render();
  });
  source.addEventListener("problem", (ev) => {
    document.getElementById("selector-error").textContent = JSON.parse(ev.data).detail;
    source.close();
  });
  source.addEventListener("logout", () => { window.location.assign("/login"); });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) window.location.assign("/login");
  };
}

function hostsPage() {
  const input = document.getElementById("selector");
  document.getElementById("filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    cursors = [""];
    listen(input.value.trim());
  });
  document.getElementById("next-page").addEventListener("click", () => {
    if (!latest || !latest.next_cursor) return;
    cursors.push(latest.next_cursor);
    listen(selectorShown);
  });
  document.getElementById("prev-page").addEventListener("click", () => {
    if (cursors.length < 2) return;
    cursors.pop();
    listen(selectorShown);
  });
  listen("");
  setInterval(render, 5000);  // keeps "12s ago" current between updates
}

// ---------------------------------------------------------------- the API, with the cookie

function csrf() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (method !== "GET") init.headers["X-CSRF-Token"] = csrf();
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(`/api/v1${path}`, init);
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.detail || data.title || `HTTP ${resp.status}`);
  return data;
}

function absolute(iso) {
  return iso ? el("time", { dateTime: iso, textContent: iso.replace("T", " ").replace("Z", " UTC") }) : "-";
}

function tail(text) {
  return text ? el("pre", { className: "tail", textContent: text }) : "-";
}

function outcomeCell(outcome) {
  return el("td", {}, el("span", { className: `outcome-${outcome}`, textContent: outcome }));
}

// ---------------------------------------------------------------- one host

function hostPage() {
  const nodeId = document.body.dataset.nodeId;
  const path = `/hosts/${encodeURIComponent(nodeId)}`;
  let host = null;
  let shown = "";

  function name() {
    return (host && host.capabilities.hostname) || nodeId;
  }

  function show(data) {
    const text = JSON.stringify(data);
    if (text === shown) return;
    shown = text;
    host = data;
    const now = Date.now();
    const caps = host.capabilities;
    document.getElementById("host-title").replaceChildren(
      `Host ${name()} `, el("span", { className: "mono", textContent: `(${nodeId})` }));
    document.title = `Host ${name()} · aegis-edge relay`;
    const pill = el("span", { className: `pill pill-${host.status.toLowerCase()}`, textContent: host.status });
    const hb = host.last_heartbeat_at ? `last heartbeat ${relative(host.last_heartbeat_at, now)} (${host.last_heartbeat_at})` : "no heartbeat yet";
    document.getElementById("host-status").replaceChildren(pill, ` ${hb}`,
      host.revoked_reason ? ` — revoked: ${host.revoked_reason}` : "");
    const labels = Object.entries(caps.labels).map(([k, v]) => `${k}=${v}`).join(", ");
    const facts = [
      ["Tenant", host.tenant_id], ["Hostname", caps.hostname || "-"],
      ["OS", caps.os || "-"], ["Arch", caps.arch || "-"],
      ["Daemon version", caps.agent_version || "-"],
      ["Tools", caps.tools.join(", ") || "-"], ["Labels", labels || "-"],
      ["Enrolled", absolute(host.enrolled_at)], ["Connected since", absolute(host.connected_since)],
      ["Key thumbprint", host.key_thumbprint || "-"],
    ];
    document.getElementById("caps").replaceChildren(
      ...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", {}, v)]));
    document.getElementById("tags").replaceChildren(...caps.tags.map((tag) => {
      const remove = el("button", { type: "button", textContent: "×" });
      remove.setAttribute("aria-label", `Remove tag ${tag}`);
      remove.addEventListener("click", () => change(() => api("DELETE", `${path}/tags/${encodeURIComponent(tag)}`)));
      return el("li", {}, tag, remove);
    }));
    if (!caps.tags.length) document.getElementById("tags").append(el("li", { textContent: "no tags" }));
    document.querySelector("#history tbody").replaceChildren(...host.history.map((rec) => {
      const run = rec.fleet_command_id
        ? el("a", { href: `/runs/${encodeURIComponent(rec.fleet_command_id)}`, textContent: rec.fleet_command_id }) : "-";
      const result = rec.result === null ? "-" : el("pre", { className: "tail", textContent: JSON.stringify(rec.result, null, 1) });
      return el("tr", {},
        el("td", {}, absolute(rec.dispatched_at)),
        el("td", { className: "mono", textContent: rec.tool }),
        outcomeCell(rec.outcome),
        el("td", { textContent: rec.exit_code === null ? "-" : String(rec.exit_code) }),
        el("td", {}, tail([rec.stdout_tail, rec.stderr_tail].filter(Boolean).join("\n") || rec.error_message || "")),
        el("td", {}, result),
        el("td", { className: "mono" }, run));
    }));
    if (!host.history.length) {
      document.querySelector("#history tbody").append(el("tr", {}, el("td", { colSpan: 7, textContent: "no commands yet" })));
    }
    document.getElementById("revoke").disabled = host.status === "Revoked";
  }

  async function load() {
    try {
      show(await api("GET", `${path}?history=50`));
      document.getElementById("host-error").textContent = "";
    } catch (err) {
      document.getElementById("host-error").textContent = err.message;
    }
  }

  async function change(call) {
    const error = document.getElementById("tag-error");
    try {
      await call();
      error.textContent = "";
      await load();
    } catch (err) {
      error.textContent = err.message;
    }
  }

  document.getElementById("add-tag").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("new-tag");
    const tag = input.value.trim();
    change(async () => { await api("POST", `${path}/tags`, { tags: [tag] }); input.value = ""; });
  });
  const dialog = document.getElementById("revoke-dialog");
  document.getElementById("revoke").addEventListener("click", () => {
    document.getElementById("revoke-question").textContent =
      `Revoke host ${name()} (node ${nodeId}, tenant ${host ? host.tenant_id : "?"})? ` +
      "Its daemon is cut off now and can never reconnect with this key.";
    document.getElementById("revoke-confirm").textContent = `Revoke ${name()}`;
    dialog.showModal();
  });
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "revoke") return;
    const reason = document.getElementById("revoke-reason").value.trim();
    try {
      await api("POST", `${path}/revoke`, reason ? { reason } : {});
      await load();
      document.getElementById("revoke").focus();
    } catch (err) {
      document.getElementById("host-error").textContent = err.message;
    }
  });
  load();
  setInterval(load, 2000);  // the pill and history follow the host without a reload
}

// ---------------------------------------------------------------- fleet runs

function countsText(counts) {
  return Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
}

function runsPage() {
  let shown = "";
  async function load() {
    try {
      const data = await api("GET", "/fleet/runs?limit=100");
      const text = JSON.stringify(data);
      if (text === shown) return;
      shown = text;
      document.querySelector("#runs tbody").replaceChildren(...data.runs.map((run) => el("tr", {},
        el("td", { className: "mono" }, el("a", { href: `/runs/${encodeURIComponent(run.fleet_command_id)}`, textContent: run.fleet_command_id })),
        el("td", {}, absolute(run.created_at)),
        el("td", { textContent: run.created_by }),
        el("td", { className: "mono", textContent: run.tool }),
        el("td", { className: "mono", textContent: run.selector }),
        outcomeCell(run.outcome),
        el("td", { textContent: countsText(run.counts) }))));
      const n = data.runs.length;
      document.getElementById("runs-summary").textContent = `${n} run${n === 1 ? "" : "s"}, newest first`;
    } catch (err) {
      document.getElementById("runs-error").textContent = err.message;
    }
  }
  load();
  setInterval(load, 2000);
}

function runPage() {
  const runId = document.body.dataset.runId;
  const rows = new Map();
  let run = null;

  function targetRow(t) {
    const outcome = t.outcome;
    const tr = el("tr", {},
      el("td", { className: "mono" }, el("a", { href: `/hosts/${encodeURIComponent(t.node_id)}`, textContent: t.node_id })),
      outcomeCell(outcome),
      el("td", { textContent: t.exit_code === null ? "-" : String(t.exit_code) }),
      el("td", { textContent: t.duration_secs == null ? "-" : `${t.duration_secs.toFixed(2)} s` }),
      el("td", {}, tail([t.stdout_tail, t.stderr_tail].filter(Boolean).join("\n"))),
      el("td", { textContent: t.error_message || t.skip_reason || "-" }));
    tr.dataset.nodeId = t.node_id;
    tr.dataset.outcome = outcome;
    return tr;
  }

  function put(t) {
    const tr = targetRow(t);
    const old = rows.get(t.node_id);
    if (old) old.replaceWith(tr); else document.querySelector("#targets tbody").append(tr);
    rows.set(t.node_id, tr);
  }

  function summary() {
    const counts = {};
    for (const tr of rows.values()) counts[tr.dataset.outcome] = (counts[tr.dataset.outcome] || 0) + 1;
    const state = run && run.finished_at ? `finished: ${run.outcome}` : "running";
    document.getElementById("run-summary").textContent =
      `${rows.size} target${rows.size === 1 ? "" : "s"}, ${state}; ${countsText(counts)}`;
  }

  const events = new EventSource(`/console/runs/${encodeURIComponent(runId)}/events`);
  events.addEventListener("run", (ev) => {
    run = JSON.parse(ev.data);
    const facts = [["Tool", run.tool], ["Selector", run.selector], ["Mode", run.spec.mode || "-"],
      ["Started", absolute(run.created_at)], ["By", run.created_by]];
    document.getElementById("run-spec").replaceChildren(
      ...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", {}, v)]));
    for (const t of run.targets || []) put(t);
    summary();
    if (run.finished_at) events.close();
  });
  events.addEventListener("target", (ev) => { put(JSON.parse(ev.data)); summary(); });
  events.addEventListener("problem", (ev) => {
    document.getElementById("run-error").textContent = JSON.parse(ev.data).detail;
    events.close();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const pages = { hosts: hostsPage, host: hostPage, runs: runsPage, run: runPage };
  pages[document.body.dataset.page]();
});
