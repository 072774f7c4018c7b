// tokenrelay's chat page: no build step. Streams answers over the WebSocket API (/v1/ws: one
// socket, a "chat.completions.create" message per question, "cancel" to stop one), and falls
// back to SSE (fetch() + ReadableStream, "data:" lines) when no socket can be opened. Stop
// cancels the generation on the server either way, and the API's errors are shown as the
// person can act on them.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let current = null; // the answer being written: { stop() }
let socket = null; // the open WebSocket, once connected
let connecting = null; // its connection in progress: a Promise of a socket or null
const generations = new Map(); // WebSocket generation id → its handlers

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

const HINTS = {
  401: "Check the API key.",
  429: "The service is busy or this key is over its limit; try again shortly.",
  503: "No inference server can answer right now.",
  504: "The model took too long.",
};
// A WebSocket error carries the OpenAI error object, not an HTTP status: its type says which.
const STATUS_OF_TYPE = {
  authentication_error: 401,
  rate_limit_error: 429,
  service_unavailable: 503,
  timeout: 504,
};

function explain(status, body) {
  const message = body?.error?.message || `HTTP ${status}`;
  const hint = HINTS[status];
  return hint ? `${message} ${hint}` : message;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function showTransport(name) {
  $("transport").textContent = name;
}

function turn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("conversation").append(div);
  return div;
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) return showError(explain(response.status, body));
    const chat = body.data.filter((m) => (m.kind ?? "chat") === "chat");
    $("model").replaceChildren(...chat.map((m) => new Option(m.id, m.id)));
    showError("");
  } catch (err) {
    showError(`Cannot reach the service: ${err}`);
  }
}

// The socket, opened (and authenticated: browsers cannot send headers on a WebSocket, so the
// key goes in the first message) on first use; null when none can be opened.
function connect() {
  if (socket) return Promise.resolve(socket);
  if (connecting) return connecting;
  connecting = new Promise((resolve) => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}/v1/ws`);
    } catch {
      resolve(null);
      return;
    }
    let opened = false;
    ws.onopen = () => {
      opened = true;
      if (apiKey()) ws.send(JSON.stringify({ type: "auth", api_key: apiKey() }));
      socket = ws;
      showTransport("WebSocket");
      resolve(ws);
    };
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      const handlers = generations.get(message.id);
      if (handlers) handlers[message.type]?.(message);
      else if (message.type === "error") showError(explainSocket(message.error));
    };
    ws.onclose = (event) => {
      socket = null;
      if (!opened) return resolve(null);
      for (const handlers of generations.values()) handlers.closed(event);
      generations.clear();
    };
  }).finally(() => {
    connecting = null;
  });
  return connecting;
}

function explainSocket(error) {
  return explain(STATUS_OF_TYPE[error?.type] ?? 500, { error });
}

// The buttons while an answer is written; the function it returns ends the answer (stopped:
// the person stopped it; discarded: nothing was answered, so it joins no history).
function begin(answer) {
  $("send").disabled = true;
  $("stop").disabled = false;
  return (stopped, discarded = false) => {
    if (stopped) answer.classList.add("stopped");
    if (!discarded) history.push({ role: "assistant", content: answer.textContent });
    current = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  };
}

function overSocket(ws, request, answer, fail) {
  const id = newId();
  const end = begin(answer);
  generations.set(id, {
    chunk: (message) => {
      const delta = message.data.choices?.[0]?.delta?.content;
      if (delta) answer.textContent += delta;
    },
    done: (message) => {
      generations.delete(id);
      end(message.cancelled === true);
    },
    error: (message) => {
      generations.delete(id);
      const empty = !answer.textContent;
      end(false, empty);
      if (empty) fail();
      showError(explainSocket(message.error));
    },
    closed: (event) => {
      end(true);
      showError(`The connection closed: ${event.reason || event.code}`);
    },
  });
  current = { stop: () => ws.send(JSON.stringify({ type: "cancel", id })) };
  ws.send(JSON.stringify({ type: "chat.completions.create", id, body: request }));
}

async function overSSE(request, answer, fail) {
  const controller = new AbortController();
  let streamId = null;
  const end = begin(answer);
  current = {
    stop: () => {
      // A dropped connection would let the generation run on for its resume grace period:
      // say it is over, then go.
      if (streamId) {
        fetch(`/v1/chat/completions/${streamId}/cancel`, { method: "POST", headers: headers() });
      }
      controller.abort();
    },
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({ ...request, stream: true }),
    });
    if (!response.ok) {
      end(false, true);
      fail();
      showError(explain(response.status, await response.json().catch(() => null)));
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = "message";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trimEnd();
        buffer = buffer.slice(newline + 1);
        if (line === "") event = "message";
        if (line.startsWith("event: ")) event = line.slice(7);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (event === "error") {
          showError(explain(500, data));
          continue;
        }
        streamId = data.id ?? streamId;
        const delta = data.choices?.[0]?.delta?.content;
        if (delta) answer.textContent += delta;
      }
    }
    end(false);
  } catch (err) {
    if (err.name === "AbortError") end(true);
    else {
      end(false);
      showError(`The connection failed: ${err}`);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || current) return;
  showError("");
  turn("user", prompt);
  history.push({ role: "user", content: prompt });
  $("prompt").value = "";
  const answer = turn("assistant", "");
  const request = {
    model: $("model").value,
    messages: history.slice(),
    max_tokens: Number($("max-tokens").value),
  };
  const fail = () => {
    // Nothing was answered: take the empty turn away, and the question from the history.
    answer.remove();
    history.pop();
  };
  const ws = await connect();
  if (ws) {
    overSocket(ws, request, answer, fail);
  } else {
    showTransport("SSE");
    await overSSE(request, answer, fail);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => current?.stop());
  $("api-key").value = sessionStorage.getItem("tokenrelay-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("tokenrelay-key", $("api-key").value);
    socket?.close(); // the next question opens a socket with the new key
    loadModels();
  });
  loadModels();
});
