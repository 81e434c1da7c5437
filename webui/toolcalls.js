/* Tool calls in a reply, shown as cards (function name, pretty-printed arguments) instead of raw
 * `<tool_call>{...}</tool_call>` text: those the model wrote inline and those the server sent as
 * delta.tool_calls. Text reaches the page through textContent only.
 */
(function () {
  "use strict";

  var TAGGED = /<tool_call>\s*([\s\S]*?)\s*(?:<\/tool_call>|$)/g;

  // {text, calls}: the reply without its tagged calls, and those calls as {name, arguments}.
  function split(text) {
    var calls = [];
    var rest = text.replace(TAGGED, function (_, body) {
      var call = { name: "", arguments: body };
      try {
        var value = JSON.parse(body);
        if (value && typeof value.name === "string") {
          call = { name: value.name, arguments: value.arguments === undefined ? {} : value.arguments };
        }
      } catch (e) { /* unfinished or malformed: shown as it is */ }
      calls.push(call);
      return "";
    });
    return { text: rest.trim(), calls: calls };
  }

  function pretty(args) {
    if (typeof args === "string") {
      try { return JSON.stringify(JSON.parse(args), null, 2); } catch (e) { return args; }
    }
    return JSON.stringify(args, null, 2);
  }

  // A card per call: [{name, arguments (an object or its JSON text)}] -> a node.
  function node(calls) {
    var box = document.createElement("div");
    box.className = "tool-calls";
    calls.forEach(function (call) {
      var card = document.createElement("div");
      card.className = "tool-call";
      var head = document.createElement("div");
      head.className = "tool-call-name";
      head.textContent = "Tool call: " + (call.name || "(unreadable)");
      var args = document.createElement("pre");
      args.className = "tool-call-args";
      args.textContent = pretty(call.arguments);
      card.appendChild(head);
      card.appendChild(args);
      box.appendChild(card);
    });
    return box;
  }

  window.llaisysToolCalls = { split: split, node: node };
})();
