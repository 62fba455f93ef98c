// The medmesh dashboard: polls the node's read-only JSON API and draws what it says.
// No framework and nothing from the internet; text from the API only ever goes into the
// page as text nodes.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#2457c5", "#c2410c", "#1f7a4d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207",
  "#be185d", "#4d7c0f", "#475569"];
const SVG = "http://www.w3.org/2000/svg";
let token = null;

// The token comes once in the URL's fragment (#token=...), which the browser never sends
// to the server; it is kept for this tab only, and the URL is cleaned.
function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("medmesh-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem("medmesh-token");
}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) {
    throw new Error("This dashboard needs its token: open " + location.origin +
      "/#token=<the contents of the node's dashboard.token_file>");
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function badge(status) {
  return el("span", { class: "badge " + status.replace(/ /g, "-") }, status);
}

function ago(ms) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function num(v, digits) {
  return v === null || v === undefined ? "-" : Number(v).toFixed(digits);
}

function row(cells) {
  return el("tr", {}, ...cells.map((c) =>
    c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)));
}

function numCell(v) {
  return el("td", { class: "num" }, v);
}

// A line chart of one field over rounds, one line per site. Each line says its site and
// how many rounds it draws (data-rounds: training rounds, the initial evaluation left out).
function chart(experiment, key, title, history, colorOf, fixedRange) {
  const W = 430, H = 230, L = 48, R = 12, T = 26, B = 30;
  const series = Object.entries(history).map(([site, points]) => ({
    site,
    points: points.filter((p) => p[key] !== null && p[key] !== undefined)
      .map((p) => [p.round, p[key]]),
  }));
  const all = series.flatMap((s) => s.points);
  const maxRound = Math.max(1, ...all.map((p) => p[0]));
  let [lo, hi] = fixedRange || [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (!isFinite(lo) || !isFinite(hi)) [lo, hi] = [0, 1];
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const x = (r) => L + (W - L - R) * r / maxRound;
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const root = svg("svg", {
    class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
    "data-chart": key, "data-experiment": experiment,
  });
  root.append(svg("text", { x: L, y: 16, class: "title" }, title));
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#b8bfcc" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#b8bfcc" }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    const label = Math.abs(v) >= 100 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toFixed(2);
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, label));
  }
  for (const r of [0, Math.round(maxRound / 2), maxRound]) {
    root.append(svg("text", { x: x(r), y: H - B + 16, "text-anchor": "middle" }, String(r)));
  }
  root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "round"));
  for (const s of series) {
    if (s.points.length === 0) continue;
    const line = svg("polyline", {
      points: s.points.map(([r, v]) => `${x(r).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      stroke: colorOf(s.site),
      "data-site": s.site,
      "data-rounds": String(s.points.filter(([r]) => r >= 1).length),
    });
    line.append(svg("title", {}, s.site));
    root.append(line);
  }
  return root;
}

function experimentView(e, colorOf) {
  const head = el("h3", {}, e.title + " ", el("span", { class: "muted" }, "here: "), badge(e.status), " ",
    el("span", { class: "muted" }, e.id + " · " + e.scheme + " · " + e.rounds + " rounds · dataset " + e.dataset));
  const parts = [head];
  if (e.reason) parts.push(el("p", { class: "reason" }, "This node: " + e.reason));
  const sites = el("tbody");
  for (const s of e.sites) {
    sites.append(el("tr", { "data-site": s.site, "data-status": s.status },
      el("td", {}, el("span", { class: "swatch", style: null, "data-color": colorOf(s.site) }), s.site),
      el("td", {}, badge(s.status)),
      numCell(s.round ?? "-"),
      numCell(num(s.loss, 4)),
      numCell(num(s.metric, 3)),
      numCell(s.peers_averaged ?? "-"),
      numCell(s.averaging_shift === undefined ? "-" : num(s.averaging_shift, 5)),
      numCell(bytes(s.bytes_sent)),
      numCell(bytes(s.bytes_received)),
      el("td", {}, s.device ?? "-"),
      el("td", {}, ago(s.updated_ms)),
      el("td", { class: "reason" }, s.failure ?? "")));
  }
  parts.push(el("table", {},
    el("thead", {}, row(["site", "status", "round", "loss", e.metric, "peers", "averaging shift",
      "sent", "received", "device", "updated", "failure"].map((h) => el("th", {}, h)))),
    sites));
  if (e.history) {
    parts.push(el("div", { class: "charts" },
      chart(e.id, "metric", e.metric + " (validation) per round", e.history, colorOf, [0, 1]),
      chart(e.id, "loss", "training loss per round", e.history, colorOf),
      chart(e.id, "averaging_shift", "averaging shift (consensus proxy) per round", e.history, colorOf)));
    parts.push(el("div", { class: "legend" }, ...e.sites.map((s) =>
      el("span", {}, el("span", { class: "swatch", "data-color": colorOf(s.site) }), s.site))));
  }
  if (e.provenance && !e.provenance.error) {
    const p = e.provenance;
    parts.push(el("p", { class: "provenance" }, "Exported here after " + p.rounds_completed +
      " rounds, final " + e.metric + " " + num(p.final_metric, 3) + ", " + p.contributors.length +
      " contributing sites; model BLAKE3 ", el("code", {}, p.model_hash),
      " (provenance signed by " + p.signed_by + ")."));
  }
  return el("div", { class: "experiment", "data-experiment": e.id, "data-status": e.status }, ...parts);
}

// Inline styles are not allowed (CSP): swatch colours are set through the DOM.
function paintSwatches(root) {
  for (const s of root.querySelectorAll("[data-color]")) s.style.background = s.dataset.color;
}

function renderNode(n, c) {
  document.getElementById("node-title").textContent =
    n.site + " · consortium " + c.consortium + " (roster v" + c.roster_version + ") · medmesh " + n.version;
  const facts = document.getElementById("node-facts");
  const entries = [
    ["site", n.site], ["peer id", n.peer_id], ["version", n.version + " (protocol " + n.protocol_version + ")"],
    ["device", n.device], ["listening on", n.listen.join(", ")], ["up for", n.uptime_secs + " s"],
    ["connected members", n.connections.members + " (" + n.connections.direct + " direct, " +
      n.connections.relayed + " through relays)"],
    ["routing table", n.connections.routing_table + " peers"],
    ["reachability", n.nat.reachability + "; " + n.nat.relay_reservations + " relay reservations held, " +
      n.nat.relayed_circuits + " connections relayed for others"],
    ["traffic", bytes(n.traffic.bytes_sent) + " sent, " + bytes(n.traffic.bytes_received) + " received"],
    ["refused", n.refused.not_member + " non-members, " + n.refused.failed_handshakes +
      " failed handshakes, " + n.refused.http + " HTTP requests"],
    ["checkpoint write failures", n.checkpoint_failures],
    ["rounds short of peers", n.rounds_short_of_peers],
  ];
  facts.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const rejected = Object.entries(n.rejected);
  document.getElementById("rejected").replaceChildren(...(rejected.length
    ? rejected.map(([k, v]) => row([k, numCell(v)]))
    : [row([el("td", { class: "muted", colspan: 2 }, "none")])]));
  document.getElementById("checkpoints").replaceChildren(...(n.checkpoints.length
    ? n.checkpoints.map((k) => row([k.experiment, numCell(k.round), numCell(bytes(k.bytes)), ago(k.written_ms)]))
    : [row([el("td", { class: "muted", colspan: 4 }, "none")])]));
}

function renderConsortium(c) {
  const nodes = c.members.filter((m) => m.role === "node");
  const up = nodes.filter((m) => m.connection === "connected" || m.this_node).length;
  document.getElementById("consortium-summary").textContent =
    c.members.length + " members, " + nodes.length + " sites; this node and " + (up - 1) +
    " connected now (a node connects to the peers its rounds need, not to all).";
  document.getElementById("members").replaceChildren(...c.members.map((m) =>
    el("tr", { "data-site": m.site },
      el("td", {}, m.site, m.active ? null : el("span", { class: "muted" }, " (revoked)")),
      el("td", {}, m.role),
      el("td", {}, badge(m.connection), m.path ? el("span", { class: "muted" }, " " + m.path) : null),
      el("td", {}, m.this_node ? "-" : ago(m.last_seen_ms)),
      el("td", {}, ago(m.last_record_ms)),
      el("td", {}, m.address ?? "-"),
      el("td", {}, el("code", {}, m.peer_id.slice(0, 16) + "…")))));
}

async function refresh() {
  const [node, consortium, experiments] = await Promise.all([
    api("/api/v1/node"), api("/api/v1/consortium"), api("/api/v1/experiments")]);
  const details = await Promise.all(experiments.map((e) =>
    api("/api/v1/experiments/" + encodeURIComponent(e.id))));
  const sites = consortium.members.filter((m) => m.role === "node").map((m) => m.site).sort();
  const colorOf = (site) => COLORS[Math.max(0, sites.indexOf(site)) % COLORS.length];
  renderNode(node, consortium);
  renderConsortium(consortium);
  const list = document.getElementById("experiment-list");
  if (details.length) list.replaceChildren(...details.map((e) => experimentView(e, colorOf)));
  paintSwatches(document);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function loop() {
  const error = document.getElementById("error");
  try {
    await refresh();
    error.hidden = true;
  } catch (e) {
    error.textContent = String(e.message || e);
    error.hidden = false;
  }
  setTimeout(loop, POLL_MS);
}

readToken();
loop();
