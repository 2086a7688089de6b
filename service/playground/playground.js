// hydra-rm playground: score candidate responses through the public API and show what every head thinks.
// Plain browser JavaScript, no dependencies: it talks only to this origin (/v1/models, /v1/score).
"use strict";

const KEY_STORE = "hydra-rm-api-key";
const EXAMPLE = {
  prompt: "Write a short review of the soup at the restaurant.",
  candidates: [
    "The soup was wonderful.",
    "Terrible soup. Cold, salty, and the waiter was rude.",
    "wonderful wonderful wonderful wonderful wonderful wonderful",
  ],
};

const state = {
  mode: "pair",
  models: [],
  last: null, // {response, texts, ms}
  sort: { key: "index", dir: 1 },
  sortHead: 0,
};

const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const letter = (i) => (i < 26 ? String.fromCharCode(65 + i) : `#${i + 1}`);
const fmt = (x) => (x === null || x === undefined ? "\u2014" : Number(x).toFixed(4));
const fmtPct = (x) => (x === null || x === undefined ? "\u2014" : Number(x).toFixed(1));
const signed = (x) => (x > 0 ? "+" : "") + fmt(x);

// ---- API -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message, field) {
    super(message);
    this.status = status;
    this.type = type;
    this.field = field || null;
  }
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network", `could not reach the server: ${e.message}`);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const err = data && data.error;
    if (err) throw new ApiError(resp.status, err.type, err.message, err.field);
    throw new ApiError(resp.status, "http_error", text.slice(0, 300) || resp.statusText);
  }
  return data;
}

// ---- key prompt ------------------------------------------------------------------------------------

function askForKey(message) {
  $("key-message").textContent = `The server answered: ${message}`;
  $("key-panel").hidden = false;
  $("key-input").focus();
  $("score").disabled = true;
}

function keyState() {
  $("key-forget").hidden = !sessionStorage.getItem(KEY_STORE);
}

// ---- models ----------------------------------------------------------------------------------------

async function loadModels() {
  const box = $("models");
  box.textContent = "loading models\u2026";
  try {
    const list = await api("v1/models");
    state.models = list.data;
  } catch (e) {
    box.textContent = "";
    if (e.status === 401) {
      askForKey(e.message);
      box.append(h("span", { class: "muted", text: "no models shown without a valid API key" }));
    } else {
      box.append(h("span", { class: "bad-text", text: `models: ${e.message}` }));
    }
    return;
  }
  $("key-panel").hidden = true;
  box.textContent = "";
  for (const m of state.models) {
    const facts = [
      `${m.num_heads} heads`,
      m.architecture || m.encoder,
      m.device,
      `max ${m.max_length} tokens`,
      `default ${m.default_aggregation}`,
      m.disagreement ? `std reference n=${m.disagreement.n}` : "no std reference",
    ].filter(Boolean);
    box.append(
      h(
        "div",
        { class: "model", "data-model-id": m.id, title: `heads: ${m.head_names.join(", ")}` },
        h("strong", { text: `${m.id}:${m.version}` }),
        h("span", { class: "muted", text: facts.join(" \u00b7 ") }),
      ),
    );
  }
  const first = state.models[0];
  if (first && !$("uwo-lambda").dataset.touched) $("uwo-lambda").value = String(first.uwo_lambda);
  $("score").disabled = false;
  keyState();
  performance.mark("hydra-models-listed"); // read by bench/playground_bench.py
}

// ---- input -----------------------------------------------------------------------------------------

function addCandidate(text) {
  const list = $("candidates");
  const row = h(
    "div",
    { class: "cand" },
    h("span", { class: "tag" }),
    h("textarea", { rows: 2, "aria-label": "candidate response" }),
    h("button", {
      type: "button",
      class: "x",
      title: "remove",
      "aria-label": "remove candidate",
      onclick: () => {
        if (list.children.length > 1) row.remove();
        relabel();
      },
      text: "\u00d7",
    }),
  );
  row.querySelector("textarea").value = text || "";
  list.append(row);
  relabel();
  return row;
}

function relabel() {
  [...$("candidates").children].forEach((row, i) => {
    row.querySelector(".tag").textContent = letter(i);
  });
}

function addMessage(role, content) {
  const row = h(
    "div",
    { class: "msg" },
    h(
      "select",
      { "aria-label": "role" },
      ["system", "user", "assistant"].map((r) => h("option", { value: r, selected: r === role, text: r })),
    ),
    h("textarea", { rows: 2, "aria-label": "message content" }),
    h("button", { type: "button", class: "x", title: "remove", text: "\u00d7", onclick: () => row.remove() }),
  );
  row.querySelector("textarea").value = content || "";
  $("messages").append(row);
}

function setMode(mode) {
  state.mode = mode;
  $("pair-input").hidden = mode !== "pair";
  $("chat-input").hidden = mode !== "chat";
  for (const m of ["pair", "chat"]) {
    $(`mode-${m}`).classList.toggle("on", m === mode);
    $(`mode-${m}`).setAttribute("aria-selected", String(m === mode));
  }
  if (mode === "chat" && !$("messages").children.length) addMessage("user", $("prompt").value);
}

function candidateTexts() {
  return [...$("candidates").querySelectorAll("textarea")].map((t) => t.value);
}

function buildRequest() {
  const texts = candidateTexts();
  let items;
  if (state.mode === "chat") {
    const convo = [...$("messages").children].map((row) => ({
      role: row.querySelector("select").value,
      content: row.querySelector("textarea").value,
    }));
    items = texts.map((t) => ({ messages: [...convo, { role: "assistant", content: t }] }));
  } else {
    const prompt = $("prompt").value;
    items = texts.map((t) => ({ prompt, response: t }));
  }
  const body = { items, aggregation: "uwo", return_heads: true };
  const lam = $("uwo-lambda").value.trim();
  if (lam !== "") body.uwo_lambda = Number(lam);
  return { body, texts };
}

// ---- scoring ---------------------------------------------------------------------------------------

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  document.querySelectorAll(".bad").forEach((el) => el.classList.remove("bad"));
}

function showError(e) {
  const box = $("error");
  box.textContent = "";
  const head = e.status ? `HTTP ${e.status} \u00b7 ${e.type}` : e.type;
  box.append(h("strong", { text: head }), " ", h("span", { class: "message", text: e.message }));
  if (e.field) box.append(" ", h("code", { class: "field", text: `field: ${e.field}` }));
  box.hidden = false;
  // Point at the input the field names: items[i] is candidate i, except in chat mode the messages
  // before the candidate's own turn (items[i].messages[j], j < conversation length).
  const m = /^items\[(\d+)\](?:\.messages\[(\d+)\])?/.exec(e.field || "");
  const rows = $("candidates").children;
  const convo = $("messages").children;
  if (m && state.mode === "chat" && m[2] !== undefined && Number(m[2]) < convo.length) {
    convo[Number(m[2])].querySelector("textarea").classList.add("bad");
  } else if (m && rows[Number(m[1])]) rows[Number(m[1])].querySelector("textarea").classList.add("bad");
  else if (e.field === "items") $("candidates").classList.add("bad");
  else if (e.field === "uwo_lambda") $("uwo-lambda").classList.add("bad");
}

async function score() {
  clearError();
  const { body, texts } = buildRequest();
  const button = $("score");
  button.disabled = true;
  button.textContent = "Scoring\u2026";
  const t0 = performance.now();
  performance.mark("hydra-score-sent");
  try {
    const response = await api("v1/score", body);
    // /v1/score gives each result's heads by name ({name: reward}); the page works in head order.
    for (const r of response.results) {
      if (r.heads && !Array.isArray(r.heads)) r.heads = response.head_names.map((n) => r.heads[n]);
    }
    // `stdp` needs the model's std reference; the server computes it (one definition of the formula),
    // in a second request with the server's beta, only for models that have the reference.
    const model = state.models && state.models[0];
    if (model && model.disagreement) {
      const stdp = await api("v1/score", { items: body.items, aggregation: "stdp" });
      response.results.forEach((r, i) => {
        r.stdp = stdp.results[i].reward;
      });
      response.stdp_beta = stdp.stdp_beta;
    }
    state.last = { response, texts, ms: performance.now() - t0 };
    render();
    performance.mark("hydra-scored");
  } catch (e) {
    if (e.status === 401) askForKey(e.message);
    showError(e);
  } finally {
    button.textContent = "Score";
    button.disabled = $("key-panel").hidden === false;
  }
}

// ---- results table ---------------------------------------------------------------------------------

function columns(resp) {
  const lam = resp.uwo_lambda === null || resp.uwo_lambda === undefined ? "" : ` \u03bb=${resp.uwo_lambda}`;
  const cols = [
    { key: "index", label: "#", get: (r) => r.index, show: (r) => letter(r.index), asc: true },
    { key: "text", label: "response", get: (r) => r.text, asc: true },
    { key: "min", label: "min", get: (r) => r.min, num: true, agg: "min" },
    { key: "mean", label: "mean", get: (r) => r.mean, num: true, agg: "mean" },
    { key: "uwo", label: `UWO${lam}`, get: (r) => r.reward, num: true, agg: "uwo" },
    ...(resp.results.some((r) => r.stdp !== undefined)
      ? [{ key: "stdp", label: `stdp \u03b2=${resp.stdp_beta}`, get: (r) => r.stdp, num: true, agg: "stdp" }]
      : []),
    { key: "heads", label: "heads", get: (r) => (r.heads ? r.heads[state.sortHead] : null) },
    { key: "std", label: "head std", get: (r) => r.std, num: true },
    { key: "std_percentile", label: "std pct", get: (r) => r.std_percentile, pct: true },
    { key: "tokens", label: "tokens", get: (r) => r.tokens, show: (r) => String(r.tokens) },
    { key: "truncated", label: "truncated", get: (r) => (r.truncated ? 1 : 0), show: (r) => (r.truncated ? "yes" : "no") },
  ];
  // Optional per-item novelty (servers that compute it): shown only when some item carries a value.
  if (resp.results.some((r) => r.novelty !== undefined && r.novelty !== null)) {
    cols.push({ key: "novelty", label: "novelty", get: (r) => r.novelty, num: true });
  }
  if (resp.results.some((r) => r.novelty_percentile !== undefined && r.novelty_percentile !== null)) {
    cols.push({ key: "novelty_percentile", label: "novelty pct", get: (r) => r.novelty_percentile, pct: true });
  }
  return cols;
}

function rowsOf(resp, texts) {
  return resp.results.map((r, index) => ({ ...r, index, text: texts[index] }));
}

function sorted(rows, cols) {
  const col = cols.find((c) => c.key === state.sort.key) || cols[0];
  const dir = state.sort.dir;
  return [...rows].sort((a, b) => {
    const x = col.get(a);
    const y = col.get(b);
    if (x === null || x === undefined) return y === null || y === undefined ? a.index - b.index : 1;
    if (y === null || y === undefined) return -1;
    const c = typeof x === "string" ? x.localeCompare(y) : x - y;
    return c !== 0 ? dir * c : a.index - b.index;
  });
}

function sortBy(key, asc) {
  if (state.sort.key === key) state.sort.dir = -state.sort.dir;
  else state.sort = { key, dir: asc ? 1 : -1 };
  renderTable();
}

function headerCell(col, resp, defaultAgg) {
  const active = state.sort.key === col.key;
  const arrow = active ? (state.sort.dir > 0 ? " \u25b2" : " \u25bc") : "";
  const th = h("th", {
    class: col.num || col.pct || col.key === "tokens" ? "num" : null,
    "data-col": col.key,
    "aria-sort": active ? (state.sort.dir > 0 ? "ascending" : "descending") : "none",
  });
  th.append(h("button", { type: "button", class: "sort", onclick: () => sortBy(col.key, col.asc), text: col.label + arrow }));
  if (col.agg && col.agg === defaultAgg) th.append(h("span", { class: "badge", title: "the server's default aggregation", text: "default" }));
  if (col.key === "heads") {
    const pick = h(
      "select",
      { class: "head-pick", "aria-label": "sort by head" },
      resp.head_names.map((n, i) => h("option", { value: i, selected: i === state.sortHead, text: n })),
    );
    pick.addEventListener("change", () => {
      state.sortHead = Number(pick.value);
      state.sort = { key: "heads", dir: -1 };
      renderTable();
    });
    th.append(h("br"), pick);
  }
  return th;
}

function headBars(heads, names, scale) {
  const box = h("div", { class: "heads", role: "img", "aria-label": names.map((n, k) => `${n} ${fmt(heads[k])}`).join(", ") });
  heads.forEach((v, k) => {
    const share = scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0;
    const fill = h("span", { class: v >= 0 ? "fill pos" : "fill neg" });
    fill.style.height = `${(share * 50).toFixed(2)}%`;
    box.append(h("span", { class: "hb", "data-head": k, "data-value": v, title: `${names[k]}: ${fmt(v)}` }, fill));
  });
  return box;
}

function pctClass(p) {
  if (p === null || p === undefined) return "pct";
  return p > 95 ? "pct high" : p > 75 ? "pct mid" : "pct";
}

function renderTable() {
  const { response: resp, texts } = state.last;
  const cols = columns(resp);
  const model = state.models[0];
  const defaultAgg = model ? model.default_aggregation : null;
  const rows = rowsOf(resp, texts);
  const scale = Math.max(0, ...rows.flatMap((r) => (r.heads || []).map(Math.abs)));

  $("thead").textContent = "";
  $("thead").append(h("tr", {}, cols.map((c) => headerCell(c, resp, defaultAgg))));
  const body = $("tbody");
  body.textContent = "";
  for (const r of sorted(rows, cols)) {
    const tr = h("tr", { "data-index": r.index });
    for (const c of cols) {
      const v = c.get(r);
      let td;
      if (c.key === "text") {
        td = h("td", { class: "text", title: r.text, text: r.text.length > 90 ? `${r.text.slice(0, 90)}\u2026` : r.text });
      } else if (c.key === "heads") {
        td = h("td", { class: "heads-cell" }, r.heads ? headBars(r.heads, resp.head_names, scale) : "\u2014");
      } else if (c.pct) {
        td = h("td", { class: "num" }, h("span", { class: pctClass(v), text: fmtPct(v) }));
      } else if (c.num) {
        td = h("td", { class: v !== null && v !== undefined && v < 0 ? "num neg-text" : "num", text: fmt(v) });
      } else {
        td = h("td", { class: c.key === "truncated" && r.truncated ? "warn" : c.key === "index" ? "idx" : "num", text: c.show(r) });
      }
      td.dataset.col = c.key;
      if (v !== null && v !== undefined && c.key !== "text") td.dataset.value = String(v);
      tr.append(td);
    }
    body.append(tr);
  }
  $("legend").textContent =
    `Bars, left to right: ${resp.head_names.join(", ")}; full height = \u00b1${fmt(scale)}. ` +
    "UWO = mean \u2212 \u03bb\u00b7std\u00b2 across heads. " +
    (resp.stdp_beta !== undefined
      ? "stdp = mean \u2212 \u03b2\u00b7reward_std\u00b7std / (median std of the reference split). "
      : "") +
    "std pct: percentile of the head std among the " +
    "model's reference split (above 95: more disagreement than 95% of what it was fitted on).";
}

function render() {
  const { response: resp, texts, ms } = state.last;
  $("results").hidden = false;
  const u = resp.usage;
  $("summary").textContent =
    `${resp.model}:${resp.version} \u00b7 ${u.items} items \u00b7 ${u.tokens} tokens \u00b7 ` +
    `${u.truncated} truncated \u00b7 ${Math.round(ms)} ms`;
  renderTable();
  // Compare two: candidates as options, A and B kept where still valid.
  const a = $("cmp-a");
  const b = $("cmp-b");
  const keepA = Number(a.value || 0);
  const keepB = Number(b.value || 1);
  for (const sel of [a, b]) {
    sel.textContent = "";
    texts.forEach((t, i) => sel.append(h("option", { value: i, text: `${letter(i)} \u00b7 ${t.slice(0, 40)}` })));
  }
  a.value = String(keepA < texts.length ? keepA : 0);
  b.value = String(keepB < texts.length ? keepB : Math.min(1, texts.length - 1));
  $("compare").hidden = texts.length < 2;
  renderCompare();
}

function renderCompare() {
  if (!state.last || state.last.texts.length < 2) return;
  const resp = state.last.response;
  const ia = Number($("cmp-a").value);
  const ib = Number($("cmp-b").value);
  const A = resp.results[ia];
  const B = resp.results[ib];
  $("cmp-head-a").textContent = letter(ia);
  $("cmp-head-b").textContent = letter(ib);
  $("cmp-head-diff").textContent = `${letter(ib)} \u2212 ${letter(ia)}`;
  const lines = [];
  if (A.heads && B.heads) resp.head_names.forEach((n, k) => lines.push([n, A.heads[k], B.heads[k], `head:${k}`]));
  lines.push(["min", A.min, B.min, "min"], ["mean", A.mean, B.mean, "mean"], ["UWO", A.reward, B.reward, "uwo"]);
  if (A.stdp !== undefined && B.stdp !== undefined) lines.push(["stdp", A.stdp, B.stdp, "stdp"]);
  lines.push(["head std", A.std, B.std, "std"]);
  const scale = Math.max(0, ...lines.map(([, x, y]) => Math.abs(y - x)));
  const body = $("cmp-body");
  body.textContent = "";
  lines.forEach(([name, x, y, key]) => {
    const d = y - x;
    const bar = h("span", { class: d >= 0 ? "dfill pos" : "dfill neg" });
    const share = scale > 0 ? Math.abs(d) / scale : 0;
    bar.style.width = `${(share * 50).toFixed(2)}%`;
    bar.style[d >= 0 ? "left" : "right"] = "50%";
    const tr = h(
      "tr",
      { "data-row": key, class: key.startsWith("head:") ? null : "agg" },
      h("td", { text: name }),
      h("td", { class: "num", "data-value": x, text: fmt(x) }),
      h("td", { class: "num", "data-value": y, text: fmt(y) }),
      h("td", { class: d < 0 ? "num neg-text" : "num", "data-value": d, "data-col": "diff", text: signed(d) }),
      h("td", { class: "diffbar-col" }, h("span", { class: "diffbar" }, bar)),
    );
    body.append(tr);
  });
}

// ---- wiring ----------------------------------------------------------------------------------------

function init() {
  $("prompt").value = EXAMPLE.prompt;
  EXAMPLE.candidates.forEach((t) => addCandidate(t));
  $("add-candidate").addEventListener("click", () => addCandidate("").querySelector("textarea").focus());
  $("add-message").addEventListener("click", () => addMessage("user", ""));
  $("clear").addEventListener("click", () => {
    $("prompt").value = "";
    $("candidates").textContent = "";
    $("messages").textContent = "";
    addCandidate("");
    addCandidate("");
    if (state.mode === "chat") addMessage("user", "");
  });
  $("mode-pair").addEventListener("click", () => setMode("pair"));
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("uwo-lambda").addEventListener("input", () => {
    $("uwo-lambda").dataset.touched = "1";
  });
  $("score").addEventListener("click", score);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("score").disabled) score();
  });
  $("cmp-a").addEventListener("change", renderCompare);
  $("cmp-b").addEventListener("change", renderCompare);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    loadModels();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    keyState();
    loadModels();
  });
  loadModels();
}

init();
