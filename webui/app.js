/* The llaisys chat page: conversations in localStorage, replies streamed from the server's
 * OpenAI-compatible /v1/chat/completions (Server-Sent Events read with fetch), Stop by aborting
 * the fetch. Every piece of text from the model or the user reaches the page through
 * textContent or the markdown renderer in markdown.js, never through innerHTML.
 */
(function () {
  "use strict";

  var STORE_CONVERSATIONS = "llaisys.conversations";
  var STORE_CURRENT = "llaisys.currentConversation";
  var STORE_SETTINGS = "llaisys.settings";
  var DEFAULTS = { systemPrompt: "", temperature: 0.7, topP: 0.95, maxTokens: 512, apiKey: "" };
  var render = window.llaisysMarkdown.render;

  var state = {
    conversations: [],  // [{id, title, created, updated, messages: [{role, content, ...}]}]
    currentId: null,    // null: a fresh chat, created on its first message
    settings: Object.assign({}, DEFAULTS),
    model: null,
    generation: null,   // {conversation, message, controller, node}
    banner: null,       // {conversationId, text}: a failed request with nothing to keep
    editing: null,      // index of the user message being edited
    renderQueued: false,
    lastSave: 0,
  };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    app: $("app"), sidebar: $("sidebar"), backdrop: $("backdrop"), list: $("conversation-list"),
    newChat: $("new-chat"), sidebarToggle: $("sidebar-toggle"), title: $("chat-title"),
    modelName: $("model-name"), status: $("server-status"), messages: $("messages"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    settings: $("settings"), settingsToggle: $("settings-toggle"), settingsClose: $("settings-close"),
    settingsReset: $("settings-reset"), systemPrompt: $("system-prompt"), temperature: $("temperature"),
    topP: $("top-p"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  };

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(className, text, title, onClick) {
    var b = el("button", className, text);
    b.type = "button";
    if (title) { b.title = title; b.setAttribute("aria-label", title); }
    b.addEventListener("click", onClick);
    return b;
  }

  // ---------- storage ----------

  function readJSON(key, fallback) {
    try {
      var raw = localStorage.getItem(key);
      return raw == null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  }

  function load() {
    var saved = readJSON(STORE_SETTINGS, {});
    if (saved && typeof saved === "object") {
      Object.keys(DEFAULTS).forEach(function (k) {
        if (typeof saved[k] === typeof DEFAULTS[k]) state.settings[k] = saved[k];
      });
    }
    var convs = readJSON(STORE_CONVERSATIONS, []);
    state.conversations = (Array.isArray(convs) ? convs : []).filter(function (c) {
      return c && typeof c.id === "string" && Array.isArray(c.messages);
    }).map(function (c) {
      c.title = typeof c.title === "string" ? c.title : "Untitled";
      c.messages = c.messages.filter(function (m) {
        return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
      });
      c.messages.forEach(function (m) {
        if (m.pending) { m.pending = false; m.stopped = true; } // the page closed mid-reply
      });
      return c;
    });
    var current = readJSON(STORE_CURRENT, null);
    state.currentId = findConversation(current) ? current : null;
  }

  function saveConversations() {
    state.lastSave = Date.now();
    try {
      localStorage.setItem(STORE_CONVERSATIONS, JSON.stringify(state.conversations));
      localStorage.setItem(STORE_CURRENT, JSON.stringify(state.currentId));
    } catch (e) {
      setStatus("could not save conversations: " + e.message, "bad");
    }
  }

  function saveSettings() {
    try {
      localStorage.setItem(STORE_SETTINGS, JSON.stringify(state.settings));
    } catch (e) {
      setStatus("could not save settings: " + e.message, "bad");
    }
  }

  function findConversation(id) {
    for (var i = 0; i < state.conversations.length; i++) {
      if (state.conversations[i].id === id) return state.conversations[i];
    }
    return null;
  }

  function current() {
    return findConversation(state.currentId);
  }

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "c" + Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function titleFrom(text) {
    var t = text.replace(/\s+/g, " ").trim();
    return t.length > 48 ? t.slice(0, 47) + "…" : t || "New chat";
  }

  // ---------- sidebar ----------

  function renderSidebar() {
    ui.list.textContent = "";
    var sorted = state.conversations.slice().sort(function (a, b) { return b.updated - a.updated; });
    if (!sorted.length) {
      ui.list.appendChild(el("li", "conversation-empty", "No conversations yet"));
    }
    sorted.forEach(function (conv) {
      var li = el("li", "conversation-item");
      li.dataset.id = conv.id;
      li.setAttribute("data-testid", "conversation-item");
      if (conv.id === state.currentId) {
        li.classList.add("active");
        li.setAttribute("aria-current", "true");
      }
      if (state.generation && state.generation.conversation === conv) li.classList.add("generating");
      var open = button("conv-title", conv.title, null, function () { selectConversation(conv.id); });
      open.title = conv.title;
      li.appendChild(open);
      li.appendChild(button("conv-rename icon", "✎", "Rename conversation", function () { startRename(li, conv); }));
      li.appendChild(button("conv-delete icon", "×", "Delete conversation", function () { askDelete(li, conv); }));
      ui.list.appendChild(li);
    });
  }

  function startRename(li, conv) {
    li.textContent = "";
    li.classList.add("renaming");
    var input = el("input", "conv-rename-input");
    input.type = "text";
    input.value = conv.title;
    input.maxLength = 200;
    input.setAttribute("aria-label", "Conversation name");
    var done = false;
    function finish(commit) {
      if (done) return;
      done = true;
      var name = input.value.replace(/\s+/g, " ").trim();
      if (commit && name) {
        conv.title = name;
        saveConversations();
      }
      renderSidebar();
      renderHeader();
    }
    input.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { e.preventDefault(); finish(true); }
      else if (e.key === "Escape") { e.preventDefault(); finish(false); }
    });
    input.addEventListener("blur", function () { finish(true); });
    li.appendChild(input);
    input.focus();
    input.select();
  }

  function askDelete(li, conv) {
    li.textContent = "";
    li.classList.add("confirming");
    var label = el("span", "conv-confirm-label", "Delete “" + conv.title + "”?");
    li.appendChild(label);
    li.appendChild(button("conv-delete-confirm danger", "Delete", "Delete for good", function () {
      deleteConversation(conv);
    }));
    li.appendChild(button("conv-delete-cancel", "Keep", "Keep it", renderSidebar));
  }

  function deleteConversation(conv) {
    if (state.generation && state.generation.conversation === conv) state.generation.controller.abort();
    state.conversations = state.conversations.filter(function (c) { return c !== conv; });
    if (state.currentId === conv.id) {
      state.currentId = null;
      state.editing = null;
    }
    saveConversations();
    renderAll();
  }

  function selectConversation(id) {
    state.currentId = id;
    state.editing = null;
    state.banner = null;
    saveConversations();
    closeSidebar();
    renderAll();
    ui.messages.scrollTop = ui.messages.scrollHeight;
    ui.prompt.focus();
  }

  function openSidebar() {
    ui.app.classList.add("sidebar-open");
    ui.backdrop.hidden = false;
    ui.sidebarToggle.setAttribute("aria-expanded", "true");
  }

  function closeSidebar() {
    ui.app.classList.remove("sidebar-open");
    ui.backdrop.hidden = true;
    ui.sidebarToggle.setAttribute("aria-expanded", "false");
  }

  // ---------- messages ----------

  function renderHeader() {
    var conv = current();
    ui.title.textContent = conv ? conv.title : "New chat";
    document.title = (conv ? conv.title + " · " : "") + "llaisys chat";
  }

  function renderAll() {
    renderSidebar();
    renderHeader();
    renderMessages();
    updateComposer();
  }

  function renderMessages() {
    var conv = current();
    ui.messages.textContent = "";
    if (state.generation) state.generation.node = null;
    if (!conv || !conv.messages.length) {
      var empty = el("div", "empty-state");
      empty.appendChild(el("h2", null, "Chat with the model"));
      empty.appendChild(el("p", null, "Replies stream in as they are generated; Stop keeps what has arrived. " +
        "Conversations and settings stay in this browser."));
      ui.messages.appendChild(empty);
    } else {
      conv.messages.forEach(function (msg, i) {
        var node = messageNode(conv, msg, i);
        ui.messages.appendChild(node);
        if (state.generation && state.generation.message === msg) state.generation.node = node;
      });
    }
    if (state.banner && conv && state.banner.conversationId === conv.id) {
      ui.messages.appendChild(bannerNode(state.banner.text));
    }
  }

  function bannerNode(text) {
    var box = el("div", "error banner");
    box.setAttribute("role", "alert");
    box.setAttribute("data-testid", "error");
    box.appendChild(el("span", "error-text", text));
    var conv = current();
    if (conv && conv.messages.length && conv.messages[conv.messages.length - 1].role === "user") {
      box.appendChild(button("retry", "Retry", "Send the last message again", function () {
        if (!state.generation) generate(conv);
      }));
    }
    return box;
  }

  function messageNode(conv, msg, index) {
    var node = el("div", "message " + msg.role);
    node.dataset.index = String(index);
    node.setAttribute("data-testid", "message-" + msg.role);
    var last = index === conv.messages.length - 1;
    var busy = !!state.generation;

    if (msg.role === "user") {
      if (state.editing === index && !busy) {
        node.classList.add("editing");
        var area = el("textarea", "edit-input");
        area.value = msg.content;
        area.rows = Math.min(12, Math.max(2, msg.content.split("\n").length));
        area.setAttribute("aria-label", "Edit message");
        area.addEventListener("keydown", function (e) {
          if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); saveEdit(conv, index, area.value); }
          else if (e.key === "Escape") { e.preventDefault(); cancelEdit(); }
        });
        node.appendChild(area);
        var row = el("div", "actions");
        row.appendChild(button("edit-save primary", "Save & regenerate", "Replace this message and regenerate from here",
          function () { saveEdit(conv, index, area.value); }));
        row.appendChild(button("edit-cancel", "Cancel", "Cancel editing", cancelEdit));
        node.appendChild(row);
        setTimeout(function () { area.focus(); }, 0);
        return node;
      }
      var bubble = el("div", "bubble");
      bubble.appendChild(el("div", "content", msg.content));
      node.appendChild(bubble);
      var actions = el("div", "actions");
      var edit = button("edit-message", "Edit", "Edit this message and regenerate from here", function () {
        state.editing = index;
        renderMessages();
      });
      edit.disabled = busy;
      actions.appendChild(edit);
      node.appendChild(actions);
      return node;
    }

    var content = el("div", "content markdown");
    node.appendChild(content);
    var footer = el("div", "reply-footer");
    node.appendChild(footer);
    fillAssistant(node, msg, last && !busy);
    return node;
  }

  // (Re)draw an assistant message's content, stats, errors and actions.
  function fillAssistant(node, msg, canRegenerate) {
    var content = node.querySelector(".content");
    var footer = node.querySelector(".reply-footer");
    content.textContent = "";
    footer.textContent = "";
    node.classList.toggle("pending", !!msg.pending);
    node.classList.toggle("stopped", !!msg.stopped);
    var reply = window.llaisysToolCalls.split(msg.content || "");
    var calls = reply.calls.concat(msg.toolCalls || []);
    if (reply.text) content.appendChild(render(reply.text));
    if (calls.length) content.appendChild(window.llaisysToolCalls.node(calls));
    var empty = !msg.content && !calls.length;
    if (empty && msg.pending) {
      var typing = el("div", "typing");
      typing.setAttribute("aria-label", "waiting for the first token");
      typing.appendChild(el("span"));
      typing.appendChild(el("span"));
      typing.appendChild(el("span"));
      content.appendChild(typing);
    } else if (empty && msg.stopped) {
      content.appendChild(el("p", "muted", "(stopped before any text arrived)"));
    }
    if (msg.error) {
      var err = el("div", "error");
      err.setAttribute("role", "alert");
      err.setAttribute("data-testid", "error");
      err.textContent = msg.error;
      footer.appendChild(err);
    }
    if (msg.stats || msg.stopped) {
      footer.appendChild(statsNode(msg));
    }
    if (!msg.pending) {
      var actions = el("div", "actions");
      if (msg.content) {
        var copy = button("copy-message", "Copy", "Copy the reply's markdown", function () {
          window.llaisysMarkdown.copyText(msg.content).then(function (ok) {
            copy.textContent = ok ? "Copied" : "Copy failed";
            setTimeout(function () { copy.textContent = "Copy"; }, 1500);
          });
        });
        actions.appendChild(copy);
      }
      if (canRegenerate) {
        actions.appendChild(button("regenerate", "Regenerate", "Generate this answer again", regenerateLast));
      }
      footer.appendChild(actions);
    }
  }

  function statsNode(msg) {
    var s = msg.stats || {};
    var parts = [];
    if (typeof s.tokens === "number") parts.push((s.approx ? "~" : "") + s.tokens + (s.tokens === 1 ? " token" : " tokens"));
    if (typeof s.tps === "number") parts.push(s.tps.toFixed(1) + " tok/s");
    if (typeof s.ttft === "number") parts.push("TTFT " + (s.ttft / 1000).toFixed(2) + " s");
    if (s.finish === "length") parts.push("cut at max tokens");
    var box = el("div", "reply-stats", parts.join(" · "));
    box.setAttribute("data-testid", "reply-stats");
    box.title = "tokens: usage.completion_tokens from the server (~ when counted from streamed pieces); " +
      "tok/s: tokens after the first, over the time from the first to the last piece; " +
      "TTFT: from sending to the first piece of text";
    if (msg.stopped) {
      var tag = el("span", "stopped-tag", "stopped");
      tag.setAttribute("data-testid", "stopped");
      if (parts.length) box.appendChild(document.createTextNode(" · "));
      box.appendChild(tag);
    }
    return box;
  }

  function isNearBottom() {
    var m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // Redraw the streaming reply at most once per frame.
  function queueReplyRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    var run = function () {
      state.renderQueued = false;
      var g = state.generation;
      if (!g || !g.node || !g.node.isConnected) return;
      var stick = isNearBottom();
      fillAssistant(g.node, g.message, false);
      if (stick) scrollToBottom();
    };
    if (document.hidden) setTimeout(run, 100);
    else requestAnimationFrame(run);
  }

  function cancelEdit() {
    state.editing = null;
    renderMessages();
  }

  function saveEdit(conv, index, text) {
    if (state.generation) return;
    if (!text.trim()) return;
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push({ role: "user", content: text });
    conv.updated = Date.now();
    state.editing = null;
    state.banner = null;
    generate(conv);
  }

  function regenerateLast() {
    var conv = current();
    if (!conv || state.generation) return;
    while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    if (!conv.messages.length) return;
    state.banner = null;
    generate(conv);
  }

  // ---------- composer ----------

  function updateComposer() {
    var busy = !!state.generation;
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.send.disabled = busy;
    ui.app.classList.toggle("busy", busy);
  }

  function autosize() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 220) + "px";
  }

  function send() {
    if (state.generation) return;
    var text = ui.prompt.value;
    if (!text.trim()) return;
    var conv = current();
    if (!conv) {
      conv = { id: newId(), title: titleFrom(text), created: Date.now(), updated: Date.now(), messages: [] };
      state.conversations.push(conv);
      state.currentId = conv.id;
    }
    conv.messages.push({ role: "user", content: text });
    conv.updated = Date.now();
    state.banner = null;
    state.editing = null;
    ui.prompt.value = "";
    autosize();
    generate(conv);
  }

  // ---------- the server ----------

  function authHeaders() {
    var h = {};
    var key = state.settings.apiKey.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function ServerError(status, statusText, message) {
    var e = new Error(message);
    e.name = "ServerError";
    e.status = status;
    e.statusText = statusText;
    return e;
  }

  async function httpError(resp) {
    var text = "";
    try { text = await resp.text(); } catch (e) { text = ""; }
    var message = "";
    try {
      var body = JSON.parse(text);
      if (body && body.error) message = typeof body.error === "string" ? body.error : body.error.message;
      else if (body && body.message) message = body.message;
    } catch (e) {
      message = text.slice(0, 300);
    }
    return ServerError(resp.status, resp.statusText, message || resp.statusText || "no details");
  }

  function describe(err) {
    if (err && err.name === "ServerError") {
      var s = "Error " + err.status + (err.statusText ? " " + err.statusText : "") + ": " + err.message;
      if (err.status === 401 || err.status === 403) s += " — set the server's API key in Settings (sent as “Authorization: Bearer …”).";
      else if (err.status === 503) s += " — the server is not ready (the model may still be loading); try again shortly.";
      else if (err.status === 429) s += " — the server is busy; try again shortly.";
      else if (err.status === 404) s += " — the server may serve another model now; Retry asks it again.";
      return s;
    }
    if (err && err.name === "StreamError") return "The server failed during the reply: " + err.message;
    if (err instanceof TypeError) {
      return "Could not reach the server at " + location.origin + " (network error: " + err.message + "). Is it running?";
    }
    return "Error: " + (err && err.message ? err.message : String(err));
  }

  async function fetchModel(signal) {
    var resp = await fetch("v1/models", { headers: authHeaders(), signal: signal });
    if (!resp.ok) throw await httpError(resp);
    var body = await resp.json();
    if (!body || !Array.isArray(body.data) || !body.data.length || !body.data[0].id) {
      throw new Error("the server lists no models at /v1/models");
    }
    state.model = body.data[0].id;
    ui.modelName.textContent = state.model;
    ui.modelName.title = "model: " + state.model;
    return state.model;
  }

  var healthTimer = null;

  function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.className = "server-status" + (kind ? " " + kind : "");
  }

  async function checkHealth() {
    clearTimeout(healthTimer);
    try {
      var resp = await fetch("health", { cache: "no-store" });
      if (resp.ok) {
        setStatus("ready", "ok");
        if (!state.model) {
          fetchModel().catch(function (e) {
            if (e.status === 401) setStatus("API key needed (Settings)", "bad");
          });
        }
        return;
      }
      setStatus(resp.status === 503 ? "loading model…" : "server answered " + resp.status, "wait");
      healthTimer = setTimeout(checkHealth, 2000);
    } catch (e) {
      setStatus("server unreachable", "bad");
      healthTimer = setTimeout(checkHealth, 5000);
    }
  }

  // Calls onEvent(parsed JSON) for each `data:` event of a Server-Sent Events body. Returns true at
  // `data: [DONE]`, false if the body ends without it; on any error the body is cancelled.
  async function readEvents(resp, onEvent) {
    var reader = resp.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";

    function handle(block) {
      var data = [];
      block.split("\n").forEach(function (line) {
        if (line.slice(0, 5) === "data:") data.push(line.slice(line.charAt(5) === " " ? 6 : 5));
      });
      if (!data.length) return false; // a comment or a field other than data
      var payload = data.join("\n");
      if (payload.trim() === "[DONE]") return true;
      var obj;
      try {
        obj = JSON.parse(payload);
      } catch (e) {
        var bad = new Error("unreadable event from the server: " + payload.slice(0, 200));
        bad.name = "StreamError";
        throw bad;
      }
      onEvent(obj);
      return false;
    }

    try {
      for (;;) {
        var r = await reader.read();
        buffer += r.done ? decoder.decode() : decoder.decode(r.value, { stream: true });
        // Normalise line ends, but leave a trailing \r: its \n may come in the next chunk.
        buffer = buffer.replace(/\r\n|\r(?!$)/g, "\n");
        var cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          var block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (handle(block)) {
            reader.cancel().catch(function () {});
            return true;
          }
        }
        if (r.done) return buffer.trim() ? handle(buffer.replace(/\r$/, "")) : false;
      }
    } catch (err) {
      reader.cancel().catch(function () {});
      throw err;
    }
  }

  function requestMessages(conv, upTo) {
    var out = [];
    var system = state.settings.systemPrompt;
    if (system.trim()) out.push({ role: "system", content: system });
    conv.messages.slice(0, upTo).forEach(function (m) {
      if (m.content) out.push({ role: m.role, content: m.content });
    });
    return out;
  }

  async function generate(conv) {
    var message = { role: "assistant", content: "", pending: true };
    state.banner = null;
    conv.messages.push(message);
    conv.updated = Date.now();
    var controller = new AbortController();
    state.generation = { conversation: conv, message: message, controller: controller, node: null };
    saveConversations();
    renderAll();
    scrollToBottom();

    var sent = performance.now();
    var firstAt = null, lastAt = null, pieces = 0, usage = null, finish = null, done = false;
    try {
      var model = state.model || await fetchModel(controller.signal);
      var body = {
        model: model,
        messages: requestMessages(conv, conv.messages.length - 1),
        stream: true,
        stream_options: { include_usage: true },
      };
      var s = state.settings;
      if (isFinite(s.temperature)) body.temperature = s.temperature;
      if (isFinite(s.topP)) body.top_p = s.topP;
      if (isFinite(s.maxTokens) && s.maxTokens > 0) body.max_tokens = Math.floor(s.maxTokens);
      sent = performance.now();
      var resp = await fetch("v1/chat/completions", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json", Accept: "text/event-stream" }, authHeaders()),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw await httpError(resp);
      if (!resp.body) throw new Error("this browser cannot read a streamed response");
      done = await readEvents(resp, function (event) {
        if (event.error) {
          var e = new Error(typeof event.error === "string" ? event.error : (event.error.message || JSON.stringify(event.error)));
          e.name = "StreamError";
          throw e;
        }
        if (event.usage) usage = event.usage;
        var choice = event.choices && event.choices[0];
        if (!choice) return;
        var piece = choice.delta && choice.delta.content;
        if (piece) {
          var now = performance.now();
          if (firstAt === null) firstAt = now;
          lastAt = now;
          pieces++;
          message.content += piece;
          queueReplyRender();
          if (Date.now() - state.lastSave > 1000) saveConversations();
        }
        // A call comes in pieces (its name first, then its arguments' text), joined by index.
        (choice.delta && choice.delta.tool_calls || []).forEach(function (piece) {
          if (!piece.function) return;
          var calls = message.toolCalls = message.toolCalls || [];
          var i = typeof piece.index === "number" ? piece.index : calls.length;
          calls[i] = calls[i] || { name: "", arguments: "" };
          calls[i].name += piece.function.name || "";
          calls[i].arguments += piece.function.arguments || "";
          queueReplyRender();
        });
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      if (!done && !finish) {
        var cut = new Error("the connection closed before the reply was finished");
        cut.name = "StreamError";
        throw cut;
      }
    } catch (err) {
      if (err && err.name === "AbortError") message.stopped = true;
      else message.error = describe(err);
      if (err && (err.status === 404 || err.status === 401)) state.model = null;
      if (err instanceof TypeError) checkHealth();
    } finally {
      message.pending = false;
      var tokens = usage && typeof usage.completion_tokens === "number" ? usage.completion_tokens : null;
      var stats = { tokens: tokens !== null ? tokens : pieces, approx: tokens === null, finish: finish };
      if (firstAt !== null) stats.ttft = firstAt - sent;
      if (firstAt !== null && lastAt > firstAt && stats.tokens > 1) {
        stats.tps = (stats.tokens - 1) / ((lastAt - firstAt) / 1000);
      }
      if (pieces || tokens) message.stats = stats;
      if (!message.content && message.error) {
        // Nothing to keep: the failure is shown as a banner with a Retry button instead.
        conv.messages.pop();
        state.banner = { conversationId: conv.id, text: message.error };
      }
      conv.updated = Date.now();
      state.generation = null;
      saveConversations();
      renderAll();
      if (conv === current()) scrollToBottom();
    }
  }

  function stop() {
    if (state.generation) state.generation.controller.abort();
  }

  // ---------- settings ----------

  function fillSettings() {
    var s = state.settings;
    ui.systemPrompt.value = s.systemPrompt;
    ui.temperature.value = String(s.temperature);
    ui.topP.value = String(s.topP);
    ui.maxTokens.value = String(s.maxTokens);
    ui.apiKey.value = s.apiKey;
  }

  function readSettings() {
    var s = state.settings;
    var num = function (input, fallback) {
      var v = parseFloat(input.value);
      input.classList.toggle("invalid", input.value !== "" && !isFinite(v));
      return input.value === "" ? NaN : (isFinite(v) ? v : fallback);
    };
    var oldKey = s.apiKey;
    s.systemPrompt = ui.systemPrompt.value;
    s.temperature = num(ui.temperature, DEFAULTS.temperature);
    s.topP = num(ui.topP, DEFAULTS.topP);
    s.maxTokens = num(ui.maxTokens, DEFAULTS.maxTokens);
    s.apiKey = ui.apiKey.value;
    saveSettings();
    if (s.apiKey !== oldKey) {
      state.model = null;
      clearTimeout(healthTimer);
      healthTimer = setTimeout(checkHealth, 400);
    }
  }

  function toggleSettings(show) {
    var open = show === undefined ? ui.settings.hidden : show;
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
    ui.app.classList.toggle("settings-open", open);
    if (open) ui.systemPrompt.focus();
  }

  // ---------- wiring ----------

  ui.composer.addEventListener("submit", function (e) { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", autosize);
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", function () { selectConversation(null); });
  ui.sidebarToggle.addEventListener("click", function () {
    if (ui.app.classList.contains("sidebar-open")) closeSidebar(); else openSidebar();
  });
  ui.backdrop.addEventListener("click", function () { closeSidebar(); toggleSettings(false); });
  ui.settingsToggle.addEventListener("click", function () { closeSidebar(); toggleSettings(); });
  ui.settingsClose.addEventListener("click", function () { toggleSettings(false); });
  ui.settings.addEventListener("submit", function (e) { e.preventDefault(); readSettings(); toggleSettings(false); });
  ui.settingsReset.addEventListener("click", function () {
    state.settings = Object.assign({}, DEFAULTS, { apiKey: state.settings.apiKey });
    fillSettings();
    readSettings();
  });
  [ui.systemPrompt, ui.temperature, ui.topP, ui.maxTokens, ui.apiKey].forEach(function (input) {
    input.addEventListener("input", readSettings);
    input.addEventListener("change", readSettings);
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") {
      if (!ui.settings.hidden) toggleSettings(false);
      closeSidebar();
    }
  });

  var wide = window.matchMedia("(min-width: 761px)");
  function placeholder() {
    ui.prompt.placeholder = wide.matches ? "Message the model (Enter sends, Shift+Enter for a new line)" : "Message the model";
  }
  if (wide.addEventListener) wide.addEventListener("change", placeholder);
  placeholder();

  load();
  fillSettings();
  renderAll();
  scrollToBottom();
  checkHealth();
  window.llaisysChat = { state: state, stop: stop };
})();
