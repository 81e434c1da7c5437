/* A small, safe markdown renderer for model replies.
 *
 * render(text) returns a DocumentFragment built only with createElement / createTextNode /
 * textContent: no string of the input ever reaches innerHTML, so a reply holding
 * <script> or <img onerror=...> is shown as the literal text it is.
 *
 * Blocks: paragraphs (single newlines become line breaks), ATX headings, fenced code blocks
 * (``` or ~~~, with a language label and a copy button; an unclosed fence runs to the end, as
 * it does while a reply is still streaming), bullet and numbered lists (nested by indentation),
 * block quotes, horizontal rules, GFM tables.
 * Inline: `code`, **bold** / __bold__, *italic* / _italic_, ~~strike~~, backslash escapes,
 * [links](https://...) and bare https:// URLs. Only http: and https: links become <a>; any other
 * link is left as the text that was written.
 *
 * Elements it can produce: p h1-h6 strong em del code pre a ul ol li blockquote hr br table
 * thead tbody tr th td div span button.
 */
(function () {
  "use strict";

  var FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  var HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  var RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  var LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
  var QUOTE = /^ {0,3}> ?(.*)$/;
  var TABLE_SEP = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;
  var ESCAPABLE = "\\`*_{}[]()#+-.!~|<>\"'";
  var MAX_DEPTH = 12;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function expandTabs(line) {
    return line.indexOf("\t") < 0 ? line : line.replace(/\t/g, "    ");
  }

  function indentOf(line) {
    var m = /^ */.exec(line);
    return m[0].length;
  }

  function isBlank(line) {
    return /^\s*$/.test(line);
  }

  // ---- inline ----

  function isWordChar(ch) {
    return !!ch && /[\p{L}\p{N}]/u.test(ch);
  }

  function safeUrl(raw) {
    var url = raw.trim();
    if (url.charAt(0) === "<" && url.charAt(url.length - 1) === ">") url = url.slice(1, -1);
    if (!/^https?:\/\//i.test(url)) return null;
    try {
      var parsed = new URL(url);
      if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return null;
      return parsed.href;
    } catch (e) {
      return null;
    }
  }

  function link(href, parent) {
    var a = document.createElement("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    parent.appendChild(a);
    return a;
  }

  // The end of a [label] starting at `open`, allowing nested brackets; -1 when unbalanced.
  function closingBracket(src, open) {
    var depth = 0;
    for (var i = open; i < src.length; i++) {
      var ch = src.charAt(i);
      if (ch === "\\") { i++; continue; }
      if (ch === "`") {
        var run = /^`+/.exec(src.slice(i))[0];
        var end = src.indexOf(run, i + run.length);
        if (end > 0) i = end + run.length - 1;
        continue;
      }
      if (ch === "[") depth++;
      else if (ch === "]" && --depth === 0) return i;
    }
    return -1;
  }

  // The ")" matching the "(" at `open` (URLs may hold balanced parentheses); -1 when there is none.
  function closingParen(src, open) {
    var depth = 0;
    for (var i = open; i < src.length; i++) {
      var ch = src.charAt(i);
      if (ch === "\\") { i++; continue; }
      if (ch === "\n") return -1;
      if (ch === "(") depth++;
      else if (ch === ")" && --depth === 0) return i;
    }
    return -1;
  }

  // A closing emphasis delimiter `delim` after `from`: content non-empty, not padded with spaces.
  function closingDelimiter(src, from, delim) {
    var ch = delim.charAt(0);
    for (var i = src.indexOf(delim, from); i >= 0; i = src.indexOf(delim, i + 1)) {
      if (i === from) continue;
      if (/\s/.test(src.charAt(i - 1))) continue;
      if (src.charAt(i - 1) === "\\") continue;
      if (delim.length === 1 && (src.charAt(i + 1) === ch || src.charAt(i - 1) === ch)) continue;
      if (ch === "_" && isWordChar(src.charAt(i + delim.length))) continue;
      return i;
    }
    return -1;
  }

  function inline(src, parent, depth, inLink) {
    var buf = "";
    function flush() {
      if (buf) parent.appendChild(document.createTextNode(buf));
      buf = "";
    }
    if (depth > MAX_DEPTH) {
      parent.appendChild(document.createTextNode(src));
      return;
    }
    var i = 0;
    while (i < src.length) {
      var ch = src.charAt(i);
      var rest;

      if (ch === "\\" && i + 1 < src.length && ESCAPABLE.indexOf(src.charAt(i + 1)) >= 0) {
        buf += src.charAt(i + 1);
        i += 2;
        continue;
      }

      if (ch === "`") {
        var run = /^`+/.exec(src.slice(i))[0];
        var end = src.indexOf(run, i + run.length);
        while (end >= 0 && src.charAt(end + run.length) === "`") {
          end = src.indexOf(run, end + run.length + 1);
        }
        if (end >= 0) {
          var code = src.slice(i + run.length, end);
          if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
          flush();
          parent.appendChild(el("code", null, code));
          i = end + run.length;
        } else {
          buf += run;
          i += run.length;
        }
        continue;
      }

      if ((ch === "*" || ch === "_" || ch === "~") && src.charAt(i + 1) === ch &&
          src.charAt(i + 2) !== ch && !/\s/.test(src.charAt(i + 2) || " ") &&
          !(ch === "_" && isWordChar(src.charAt(i - 1)))) {
        var dclose = closingDelimiter(src, i + 2, ch + ch);
        if (dclose > i + 2) {
          flush();
          var strong = el(ch === "~" ? "del" : "strong");
          inline(src.slice(i + 2, dclose), strong, depth + 1, inLink);
          parent.appendChild(strong);
          i = dclose + 2;
          continue;
        }
      }

      if ((ch === "*" || ch === "_") && src.charAt(i + 1) !== ch &&
          !/\s/.test(src.charAt(i + 1) || " ") && !(ch === "_" && isWordChar(src.charAt(i - 1)))) {
        var sclose = closingDelimiter(src, i + 1, ch);
        if (sclose > i + 1) {
          flush();
          var em = el("em");
          inline(src.slice(i + 1, sclose), em, depth + 1, inLink);
          parent.appendChild(em);
          i = sclose + 1;
          continue;
        }
      }

      if (ch === "[" && !inLink) {
        var close = closingBracket(src, i);
        if (close > i && src.charAt(close + 1) === "(") {
          var paren = closingParen(src, close + 1);
          if (paren > 0) {
            var target = src.slice(close + 2, paren).trim().split(/\s+/)[0] || "";
            var href = safeUrl(target);
            if (href) {
              flush();
              var a = link(href, parent);
              inline(src.slice(i + 1, close), a, depth + 1, true);
              if (!a.textContent) a.textContent = href;
              i = paren + 1;
              continue;
            }
          }
        }
      }

      if ((ch === "h" || ch === "H") && !inLink && !isWordChar(src.charAt(i - 1)) &&
          (rest = /^https?:\/\/[^\s<>"'`]+/i.exec(src.slice(i)))) {
        var url = rest[0].replace(/[.,;:!?*_~]+$/, "");
        // Keep a closing parenthesis only if the URL opened one.
        while (url.charAt(url.length - 1) === ")" &&
               (url.match(/\)/g) || []).length > (url.match(/\(/g) || []).length) {
          url = url.slice(0, -1);
        }
        var autoHref = safeUrl(url);
        if (autoHref && url.length > "https://".length) {
          flush();
          link(autoHref, parent).textContent = url;
          i += url.length;
          continue;
        }
      }

      buf += ch;
      i++;
    }
    flush();
  }

  // Paragraph text: inline markdown with single newlines shown as line breaks.
  function inlineLines(text, parent, depth) {
    var lines = text.split("\n");
    for (var k = 0; k < lines.length; k++) {
      if (k > 0) parent.appendChild(el("br"));
      // Two trailing spaces are a hard break in markdown; here every newline already is one.
      inline(lines[k].replace(/\s+$/, ""), parent, depth, false);
    }
  }

  // ---- blocks ----

  function codeBlock(lang, code) {
    var box = el("div", "code-block");
    var head = el("div", "code-head");
    head.appendChild(el("span", "code-lang", lang || "text"));
    var copy = el("button", "copy-code", "Copy");
    copy.type = "button";
    copy.title = "Copy this code";
    copy.addEventListener("click", function () {
      copyText(code).then(function (ok) {
        copy.textContent = ok ? "Copied" : "Copy failed";
        setTimeout(function () { copy.textContent = "Copy"; }, 1500);
      });
    });
    head.appendChild(copy);
    box.appendChild(head);
    var pre = el("pre");
    var codeEl = el("code", null, code);
    if (lang) codeEl.className = "language-" + lang.replace(/[^\w+#.-]/g, "");
    pre.appendChild(codeEl);
    box.appendChild(pre);
    return box;
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(function () { return true; }, function () {
        return fallbackCopy(text);
      });
    }
    return Promise.resolve(fallbackCopy(text));
  }

  function fallbackCopy(text) {
    var area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  function splitRow(line) {
    var s = line.trim();
    if (s.charAt(0) === "|") s = s.slice(1);
    if (s.charAt(s.length - 1) === "|" && s.charAt(s.length - 2) !== "\\") s = s.slice(0, -1);
    var cells = [];
    var cur = "";
    for (var i = 0; i < s.length; i++) {
      var ch = s.charAt(i);
      if (ch === "\\" && s.charAt(i + 1) === "|") { cur += "|"; i++; continue; }
      if (ch === "|") { cells.push(cur.trim()); cur = ""; continue; }
      cur += ch;
    }
    cells.push(cur.trim());
    return cells;
  }

  function table(header, sep, rows, depth) {
    var aligns = splitRow(sep).map(function (c) {
      var left = c.charAt(0) === ":", right = c.charAt(c.length - 1) === ":";
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    var wrap = el("div", "table-wrap");
    var t = el("table");
    var thead = el("thead");
    var tr = el("tr");
    var heads = splitRow(header);
    heads.forEach(function (cell, k) {
      var th = el("th");
      if (aligns[k]) th.style.textAlign = aligns[k];
      inline(cell, th, depth, false);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    t.appendChild(thead);
    var tbody = el("tbody");
    rows.forEach(function (row) {
      var cells = splitRow(row);
      var r = el("tr");
      for (var k = 0; k < heads.length; k++) {
        var td = el("td");
        if (aligns[k]) td.style.textAlign = aligns[k];
        inline(cells[k] || "", td, depth, false);
        r.appendChild(td);
      }
      tbody.appendChild(r);
    });
    t.appendChild(tbody);
    wrap.appendChild(t);
    return wrap;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
           LIST_ITEM.test(line);
  }

  function blocks(lines, parent, depth) {
    if (depth > MAX_DEPTH) {
      parent.appendChild(el("p", null, lines.join("\n")));
      return;
    }
    var i = 0;
    var m;
    while (i < lines.length) {
      var line = lines[i];
      if (isBlank(line)) { i++; continue; }

      if ((m = FENCE.exec(line))) {
        var fence = m[1];
        var lang = m[2] || "";
        var indent = indentOf(line);
        var body = [];
        i++;
        while (i < lines.length) {
          var closeM = /^ {0,3}(`{3,}|~{3,})\s*$/.exec(lines[i]);
          if (closeM && closeM[1].charAt(0) === fence.charAt(0) && closeM[1].length >= fence.length) {
            i++;
            break;
          }
          var l = lines[i];
          body.push(l.slice(Math.min(indent, indentOf(l))));
          i++;
        }
        parent.appendChild(codeBlock(lang, body.join("\n")));
        continue;
      }

      if ((m = HEADING.exec(line))) {
        var h = el("h" + m[1].length);
        inline(m[2] || "", h, depth, false);
        parent.appendChild(h);
        i++;
        continue;
      }

      if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
        continue;
      }

      if (QUOTE.test(line)) {
        var quoted = [];
        while (i < lines.length && !isBlank(lines[i])) {
          var q = QUOTE.exec(lines[i]);
          if (!q && startsBlock(lines[i])) break;
          quoted.push(q ? q[1] : lines[i]);
          i++;
        }
        var bq = el("blockquote");
        blocks(quoted, bq, depth + 1);
        parent.appendChild(bq);
        continue;
      }

      if ((m = LIST_ITEM.exec(line))) {
        i = list(lines, i, parent, depth);
        continue;
      }

      if (line.indexOf("|") >= 0 && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) &&
          lines[i + 1].indexOf("|") >= 0) {
        var header = line, sep = lines[i + 1];
        var rows = [];
        i += 2;
        while (i < lines.length && !isBlank(lines[i]) && lines[i].indexOf("|") >= 0) {
          rows.push(lines[i]);
          i++;
        }
        parent.appendChild(table(header, sep, rows, depth));
        continue;
      }

      var para = [];
      while (i < lines.length && !isBlank(lines[i]) && (para.length === 0 || !startsBlock(lines[i]))) {
        para.push(lines[i]);
        i++;
      }
      var p = el("p");
      inlineLines(para.join("\n").replace(/^ +/gm, ""), p, depth);
      parent.appendChild(p);
    }
  }

  // One list starting at lines[start]; returns the index after it.
  function list(lines, start, parent, depth) {
    var first = LIST_ITEM.exec(lines[start]);
    var baseIndent = first[1].length;
    var ordered = /\d/.test(first[2]);
    var listEl = el(ordered ? "ol" : "ul");
    if (ordered) {
      var n = parseInt(first[2], 10);
      if (n !== 1) listEl.start = n;
    }
    var i = start;
    var loose = false;
    var items = [];
    while (i < lines.length) {
      var m = LIST_ITEM.exec(lines[i]);
      if (!m || m[1].length !== baseIndent || /\d/.test(m[2]) !== ordered) break;
      var contentIndent = baseIndent + m[2].length + 1;
      var itemLines = [m[3] || ""];
      i++;
      var sawBlank = false;
      while (i < lines.length) {
        var line = lines[i];
        if (isBlank(line)) {
          sawBlank = true;
          itemLines.push("");
          i++;
          continue;
        }
        var ind = indentOf(line);
        if (ind > baseIndent) {
          // A continuation or a nested block: strip this item's indentation.
          itemLines.push(line.slice(Math.min(ind, contentIndent)));
          sawBlank = false;
          i++;
          continue;
        }
        if (!sawBlank && !LIST_ITEM.test(line) && !startsBlock(line)) {
          itemLines.push(line.slice(ind)); // lazy continuation of the item's paragraph
          i++;
          continue;
        }
        break;
      }
      while (itemLines.length && isBlank(itemLines[itemLines.length - 1])) itemLines.pop();
      if (sawBlank && i < lines.length) {
        var next = LIST_ITEM.exec(lines[i]);
        if (next && next[1].length === baseIndent) loose = true;
      }
      items.push(itemLines);
    }
    items.forEach(function (itemLines) {
      var li = el("li");
      var hasBlocks = itemLines.slice(1).some(function (l) { return isBlank(l) || startsBlock(l); });
      if (!loose && !hasBlocks) {
        inlineLines(itemLines.join("\n"), li, depth + 1);
      } else {
        blocks(itemLines, li, depth + 1);
        // A tight item's single paragraph is shown without paragraph margins.
        if (!loose && li.firstChild && li.firstChild.tagName === "P") {
          var p = li.firstChild;
          while (p.firstChild) li.insertBefore(p.firstChild, p);
          li.removeChild(p);
        }
      }
      listEl.appendChild(li);
    });
    parent.appendChild(listEl);
    return i;
  }

  function render(text) {
    var frag = document.createDocumentFragment();
    var src = String(text == null ? "" : text).replace(/\r\n?/g, "\n");
    blocks(src.split("\n").map(expandTabs), frag, 0);
    return frag;
  }

  window.llaisysMarkdown = { render: render, safeUrl: safeUrl, copyText: copyText };
  window.llaisysRender = render;
})();
