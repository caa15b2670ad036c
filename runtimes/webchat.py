"""The minimal web chat page ``edgeqlora serve`` shows at ``/``.

One self-contained HTML file (no CDN, no build step: the server may run on a device with no
network). It keeps the conversation in the page, posts it to ``/v1/chat/completions`` with
``stream: true`` and renders the server-sent events as they arrive. Messages are inserted with
``textContent``, never as HTML. Kept as a Python string so it ships without package-data rules.

When the export carries a JSON schema the page shows a "JSON mode" switch (on: the server's
default, answers follow the schema; off: ``response_format: text``); when the server wants an
API key, a key field (kept in the browser's localStorage) sends it as a bearer token.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgeqlora chat: {{MODEL}}</title>
<style>
  :root { font-family: system-ui, sans-serif; color-scheme: light dark; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: .6rem 1rem; border-bottom: 1px solid #8884; font-weight: 600; }
  header small { font-weight: 400; opacity: .7; margin-left: .5rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; }
  .msg { max-width: 46rem; margin: .4rem 0; padding: .5rem .8rem; border-radius: .6rem;
         white-space: pre-wrap; overflow-wrap: anywhere; }
  .user { background: #3b82f633; margin-left: auto; }
  .assistant { background: #8882; }
  .error { background: #ef444433; }
  form { display: flex; gap: .5rem; padding: .8rem 1rem; border-top: 1px solid #8884; }
  textarea { flex: 1; resize: none; font: inherit; padding: .5rem; min-height: 2.6rem; }
  button { font: inherit; padding: 0 1rem; }
  details { padding: 0 1rem .6rem; font-size: .9rem; }
  details input { width: 4.5rem; }
  details textarea { width: 100%; min-height: 2rem; box-sizing: border-box; }
</style>
</head>
<body>
<header>edgeqlora chat<small id="model">{{MODEL}}</small>
  <label id="jsonmode" {{SCHEMA_HIDDEN}}><small><input type="checkbox" id="json" checked>
    JSON mode</small></label></header>
<div id="log" aria-live="polite"></div>
<details>
  <summary>Settings</summary>
  <label>System prompt <textarea id="system" placeholder="(the model's default)"></textarea></label>
  <label>max tokens <input id="max" type="number" min="1" value="256"></label>
  <label>temperature <input id="temp" type="number" min="0" step="0.1" value="0"></label>
  <label id="keyfield" {{KEY_HIDDEN}}>API key <input id="key" type="password"
    autocomplete="off"></label>
  <button type="button" id="clear">Clear chat</button>
</details>
<form id="form">
  <textarea id="input" placeholder="Type a message; Enter sends, Shift+Enter adds a line"
            autofocus></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const log = document.getElementById("log");
const input = document.getElementById("input");
const send = document.getElementById("send");
let history = [];
const key = document.getElementById("key");
key.value = localStorage.getItem("edgeqlora-key") || "";
key.addEventListener("change", () => localStorage.setItem("edgeqlora-key", key.value));

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function ask(text) {
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  const system = document.getElementById("system").value.trim();
  const messages = system ? [{role: "system", content: system}, ...history] : history;
  const body = {
    messages, stream: true,
    max_tokens: Number(document.getElementById("max").value) || 256,
    temperature: Number(document.getElementById("temp").value) || 0,
  };
  if (!document.getElementById("jsonmode").hidden && !document.getElementById("json").checked) {
    body.response_format = {type: "text"};
  }
  const headers = {"Content-Type": "application/json"};
  if (key.value) headers["Authorization"] = "Bearer " + key.value;
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify(body),
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
        if (delta && delta.content) {
          reply += delta.content;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
      }
    }
    history.push({role: "assistant", content: reply});
  } catch (e) {
    history.pop();
    out.className = "msg error";
    out.textContent = "Error: " + e.message;
  }
}

document.getElementById("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || send.disabled) return;
  input.value = "";
  send.disabled = true;
  try { await ask(text); } finally { send.disabled = false; input.focus(); }
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});
document.getElementById("clear").addEventListener("click", () => {
  history = [];
  log.replaceChildren();
});
</script>
</body>
</html>
"""
