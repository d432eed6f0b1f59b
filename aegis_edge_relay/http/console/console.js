// The Edge Hosts page: a live table fed by /console/events (Server-Sent Events).
"use strict";

const STATUS_ORDER = ["Connected", "Unhealthy", "Disconnected", "Revoked"];
let source = null;
let latest = null;

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
  const tr = el("tr", {},
    el("td", { className: "mono", textContent: host.node_id }),
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
  const counts = STATUS_ORDER.filter((s) => latest.counts[s])
    .map((s) => `${latest.counts[s]} ${s}`).join(", ");
  const shown = latest.hosts.length < latest.total ? ` (first ${latest.hosts.length} shown)` : "";
  const summary = document.getElementById("summary");
  const text = `${latest.total} host${latest.total === 1 ? "" : "s"}${counts ? ": " + counts : ""}${shown}`;
  if (summary.textContent !== text) summary.textContent = text;  // announced only on change
}

function listen(selector) {
  if (source) source.close();
  document.getElementById("selector-error").textContent = "";
  const query = selector ? `?selector=${encodeURIComponent(selector)}` : "";
  source = new EventSource(`/console/events${query}`);
  source.addEventListener("hosts", (ev) => { latest = JSON.parse(ev.data); render(); });
  source.addEventListener("problem", (ev) => {
    document.getElementById("selector-error").textContent = JSON.parse(ev.data).detail;
    source.close();
  });
  source.addEventListener("logout", () => { window.location.assign("/login"); });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) window.location.assign("/login");
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("selector");
  document.getElementById("filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    listen(input.value.trim());
  });
  listen("");
  setInterval(render, 5000);  // keeps "12s ago" current between updates
});
