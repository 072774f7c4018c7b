// tokenrelay's chat page: no build step. Streams answers with fetch() + ReadableStream (SSE
// "data:" lines), stops them with an AbortController (closing the connection cancels the
// generation on the server), and shows the API's errors as the person can act on them.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function explain(status, body) {
  const message = body?.error?.message || `HTTP ${status}`;
  const hint = {
    401: "Check the API key.",
    429: "The service is busy or this key is over its limit; try again shortly.",
    503: "No inference server can answer right now.",
    504: "The model took too long.",
  }[status];
  return hint ? `${message} ${hint}` : message;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function turn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("conversation").append(div);
  return div;
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

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  showError("");
  turn("user", prompt);
  history.push({ role: "user", content: prompt });
  $("prompt").value = "";
  const answer = turn("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value,
        messages: history,
        max_tokens: Number($("max-tokens").value),
        stream: true,
      }),
    });
    if (!response.ok) {
      answer.remove();
      history.pop();
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
        if (line.startsWith("event: ")) event = line.slice(7);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (event === "error") {
          showError(explain(500, data));
          event = "message";
          continue;
        }
        const delta = data.choices?.[0]?.delta?.content;
        if (delta) answer.textContent += delta;
      }
    }
    history.push({ role: "assistant", content: answer.textContent });
  } catch (err) {
    if (err.name === "AbortError") {
      answer.classList.add("stopped");
      history.push({ role: "assistant", content: answer.textContent });
    } else {
      showError(`The connection failed: ${err}`);
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => controller?.abort());
  $("api-key").value = sessionStorage.getItem("tokenrelay-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("tokenrelay-key", $("api-key").value);
    loadModels();
  });
  loadModels();
});
