// The unipeft playground: plain browser JavaScript, no build step, talks only to this server.
"use strict";

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
let controller = null; // aborts the running request when Stop is pressed

/** Show a server or network error in the page (empty message hides it). */
function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

/** The message of an error body: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}. */
function errorMessage(body, status) {
  if (body && body.error) {
    return typeof body.error === "string" ? body.error : (body.error.message || JSON.stringify(body.error));
  }
  if (body && body.detail !== undefined) {
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    return JSON.stringify(d);
  }
  return `HTTP ${status}`;
}

/** Fetch JSON; a non-2xx answer raises an Error carrying the server's message. */
async function getJSON(url) {
  const res = await fetch(url);
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!res.ok) throw new Error(`${url}: ${errorMessage(body, res.status) || text}`);
  return body;
}

/** Parse Prometheus text into samples {name, labels, value}. */
function parseMetrics(text) {
  const samples = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw.startsWith("#")) continue;
    const m = line.exec(raw.trim());
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const GENERATION = /^\/v1\/(chat\/)?completions$/;

/** Request and token counts from the samples: per model where a series carries an adapter= (or model=)
 * label, and the server's totals over all series (generation requests by endpoint, generated tokens). */
function counts(samples) {
  const byModel = {};
  const total = { requests: 0, tokens: 0 };
  for (const s of samples) {
    if (!Number.isFinite(s.value) || /_(bucket|sum|count|created)$/.test(s.name)) continue;
    const who = s.labels.adapter ?? s.labels.model;
    const isRequests = /requests_total$/.test(s.name);
    const isTokens = /(generated|completion)_tokens_total$/.test(s.name);
    if (who !== undefined) {
      const row = (byModel[who] ||= { requests: 0, tokens: 0 });
      if (isRequests) row.requests += s.value;
      else if (isTokens) row.tokens += s.value;
    }
    if (isRequests && GENERATION.test(s.labels.endpoint || "")) total.requests += s.value;
    else if (isTokens && who === undefined) total.tokens += s.value;
  }
  return { byModel, total };
}

/** The models the server lists at /v1/models (the base first, then the adapters). */
async function listModels() {
  const body = await getJSON("/v1/models");
  return body.data || [];
}

/** Fill the adapter select, keeping the current choice when it is still loaded. */
function fillSelect(ids) {
  const select = $("adapter");
  const keep = select.value;
  const have = Array.from(select.options).map((o) => o.value);
  if (have.join("\n") === ids.join("\n")) return;
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(keep)) select.value = keep;
}

/** A table row of cells (class name, text); `key` goes to data-adapter. */
function row(key, cells) {
  const tr = document.createElement("tr");
  tr.dataset.adapter = key;
  for (const [cls, v] of cells) {
    const td = document.createElement("td");
    td.className = cls;
    td.textContent = String(v);
    tr.append(td);
  }
  return tr;
}

/** Redraw the adapter table: one row per loaded model ("-" where the server does not count per model),
 * then the server's totals. */
function fillTable(models, { byModel, total }) {
  const rows = models.map((m) => {
    const c = byModel[m.id];
    // an evicted adapter stays registered and is reloaded from its folder by its next request
    const name = m.resident === false ? `${m.id} (evicted)` : m.id;
    return row(m.id, [["name", name], ["requests", c ? c.requests : "-"], ["tokens", c ? c.tokens : "-"]]);
  });
  $("adapters").replaceChildren(...rows);
  const t = $("adapters-total");
  t.querySelector(".requests").textContent = String(total.requests);
  t.querySelector(".tokens").textContent = String(total.tokens);
}

/** Reload the model list and the metrics; errors go to the error box. */
async function refresh() {
  try {
    const models = await listModels();
    fillSelect(models.map((m) => m.id));
    const res = await fetch("/metrics");
    if (!res.ok) throw new Error(`/metrics: HTTP ${res.status}`);
    fillTable(models, counts(parseMetrics(await res.text())));
    $("metrics-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    $("adapters").dataset.updated = String(Date.now());
  } catch (err) {
    showError(String(err.message || err));
  }
}

/** The request body for the form's current values. */
function requestBody(chat) {
  const body = {
    model: $("adapter").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
  };
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  return body;
}

/** Read a server-sent-events body, calling onData with each parsed `data:` payload until [DONE]. */
async function readEvents(res, onData) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // events are separated by a blank line; a partial event stays in the buffer
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      onData(JSON.parse(data));
    }
  }
  return false;
}

/** Set the answer's state (idle, streaming, done, error, stopped) on the output and the status line. */
function setState(state, note) {
  $("output").dataset.state = state;
  $("status").textContent = note ? `${state}: ${note}` : state;
  $("send").disabled = state === "streaming";
  $("stop").disabled = state !== "streaming";
}

/** Send the form's request and stream the answer into #output token by token. */
async function send(event) {
  event.preventDefault();
  showError("");
  const chat = $("chat").checked;
  const output = $("output");
  output.textContent = "";
  $("token-count").textContent = "0";
  let tokens = 0;
  let finish = null;
  controller = new AbortController();
  setState("streaming");
  try {
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody(chat)),
      signal: controller.signal,
    });
    if (!res.ok) {
      const text = await res.text();
      let body = null;
      try { body = JSON.parse(text); } catch (_) { body = null; }
      throw new Error(`${res.status}: ${body ? errorMessage(body, res.status) : text}`);
    }
    const complete = await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(errorMessage(chunk, res.status));
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const piece = chat ? (choice.delta || {}).content : choice.text;
      if (piece) {
        output.textContent += piece;
        tokens += 1;
        $("token-count").textContent = String(tokens);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (!complete) throw new Error("the stream ended before [DONE]");
    setState("done", finish);
  } catch (err) {
    if (err.name === "AbortError") setState("stopped");
    else { showError(String(err.message || err)); setState("error"); }
  } finally {
    controller = null;
    refresh();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("refresh-seconds").textContent = String(REFRESH_MS / 1000);
  $("form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  refresh();
  setInterval(refresh, REFRESH_MS);
});
