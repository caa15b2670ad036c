"""The minimal web chat page ``edgeqlora serve`` shows at ``/``.

One self-contained HTML file (no CDN, no build step: the server may run on a device with no
network). It keeps the conversation in the page, posts it to ``/v1/chat/completions`` with
``stream: true`` and renders the server-sent events as they arrive. Messages are inserted with
``textContent``, never as HTML. Kept as a Python string so it ships without package-data rules.

It is also the phone demo: it fits a phone's viewport and installs as a web app (``MANIFEST``,
``ICON``; ``SERVICE_WORKER`` keeps the page itself for offline starts, never an answer). Browsers
run service workers only in a secure context: on ``localhost`` (``edgeqlora serve`` in Termux
on the phone itself) or behind HTTPS; from a Pi over plain http the page works, uninstalled.

When the export carries a JSON schema the page shows a "JSON mode" switch (on: the server's
default, answers follow the schema; off: ``response_format: text``); when the server wants an
API key, a key field (kept in the browser's localStorage) sends it as a bearer token.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="theme-color" content="#1f6feb">
<link rel="manifest" href="/manifest.webmanifest">
<link rel="icon" href="/icon.svg" type="image/svg+xml">
<title>edgeqlora chat: {{MODEL}}</title>
<style>
  :root { font-family: system-ui, sans-serif; color-scheme: light dark; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; height: 100dvh; }
  header { padding: .6rem 1rem; border-bottom: 1px solid #8884; font-weight: 600; }
  header small { font-weight: 400; opacity: .7; margin-left: .5rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; }
  .msg { max-width: 46rem; margin: .4rem 0; padding: .5rem .8rem; border-radius: .6rem;
         white-space: pre-wrap; overflow-wrap: anywhere; }
  .user { background: #3b82f633; margin-left: auto; }
  .assistant { background: #8882; }
  .error { background: #ef444433; }
  form { display: flex; gap: .5rem; padding: .8rem 1rem; border-top: 1px solid #8884; }
  textarea { flex: 1; resize: none; font: inherit; padding: .5rem; min-height: 2.6rem;
             min-width: 0; font-size: max(1rem, 16px); }
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
if ("serviceWorker" in navigator && window.isSecureContext) {
  navigator.serviceWorker.register("/sw.js").catch(() => {});
}
</script>
</body>
</html>
"""

MANIFEST = {
    "name": "edgeqlora chat",
    "short_name": "edgeqlora",
    "description": "Chat with the model this device serves",
    "start_url": "/",
    "scope": "/",
    "display": "standalone",
    "background_color": "#ffffff",
    "theme_color": "#1f6feb",
    "icons": [{"src": "/icon.svg", "sizes": "any", "type": "image/svg+xml",
               "purpose": "any maskable"}],
}

ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 512 512">
<rect width="512" height="512" rx="96" fill="#1f6feb"/>
<path d="M128 152h256a40 40 0 0 1 40 40v128a40 40 0 0 1-40 40H232l-72 56v-56h-32a40 40 0 0 1-40-40
V192a40 40 0 0 1 40-40z" fill="#fff"/>
<text x="256" y="290" font-family="sans-serif" font-size="120" font-weight="700"
 text-anchor="middle" fill="#1f6feb">{ }</text>
</svg>
"""

# The offline shell: the page, its manifest and icon, cached at install and served from the
# cache when the network (the server) is away. API calls are never cached.
SERVICE_WORKER = """const SHELL = "edgeqlora-shell-v1";
const FILES = ["/", "/manifest.webmanifest", "/icon.svg"];
self.addEventListener("install", (e) => {
  e.waitUntil(caches.open(SHELL).then((c) => c.addAll(FILES)).then(() => self.skipWaiting()));
});
self.addEventListener("activate", (e) => { e.waitUntil(self.clients.claim()); });
self.addEventListener("fetch", (e) => {
  const url = new URL(e.request.url);
  if (e.request.method !== "GET" || !FILES.includes(url.pathname)) return;
  e.respondWith(fetch(e.request).then((r) => {
    const copy = r.clone();
    caches.open(SHELL).then((c) => c.put(e.request, copy));
    return r;
  }).catch(() => caches.match(e.request)));
});
"""


def web_app_routes(guarded) -> list:
    """The web app's static parts as Starlette routes, each wrapped by the server's ``guarded``
    (the Host check, metrics) like every other route."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def manifest(request):
        return JSONResponse(MANIFEST, media_type="application/manifest+json")

    async def icon(request):
        return Response(ICON, media_type="image/svg+xml")

    async def worker(request):
        return Response(SERVICE_WORKER, media_type="text/javascript",
                        headers={"Cache-Control": "no-cache"})

    return [Route("/manifest.webmanifest", guarded(manifest, "/manifest.webmanifest"),
                  methods=["GET"]),
            Route("/icon.svg", guarded(icon, "/icon.svg"), methods=["GET"]),
            Route("/sw.js", guarded(worker, "/sw.js"), methods=["GET"])]
