// sae-harvest latent browser: the index table. Works from file:// (no fetch): each index shard is a
// <script> that calls LATENT_INDEX_ADD(hook, shard, rows); shard 0 is loaded with the page, the
// rest when a sort, filter or page needs them. Row: [id, density, max_act, fires_on[], promotes[], explanation, score]
// and, for a crosscoder, [decoder-norm share per input] (header columns 100 + j sort by input j).
"use strict";
var STATE = {};  // hook -> {info, shards: [rows|undefined], view: rows, sort: [col, dir], page, q}
var PAGE_ROWS = 100;

function LATENT_INDEX_ADD(hook, shard, rows) {
  var st = stateFor(hook);
  st.shards[shard] = rows;
  var waiting = st.waiting[shard];
  if (waiting) { delete st.waiting[shard]; waiting.forEach(function (f) { f(); }); }
}

function stateFor(hook) {
  if (!STATE[hook]) {
    var info = null;
    for (var i = 0; i < HOOKS.length; i++) if (HOOKS[i].hook === hook) info = HOOKS[i];
    STATE[hook] = {info: info, idx: HOOKS.indexOf(info), shards: [], waiting: {}, view: null,
                   sort: null, page: 0, q: "", complete: false};
  }
  return STATE[hook];
}

function loadShard(st, s, done) {
  if (st.shards[s]) { done(); return; }
  if (st.waiting[s]) { st.waiting[s].push(done); return; }
  st.waiting[s] = [done];
  var el = document.createElement("script");
  el.src = "index/" + st.info.dir + "/shard-" + String(s).padStart(5, "0") + ".js";
  el.onerror = function () { status(st, "could not load " + el.src); };
  document.head.appendChild(el);
}

function loadAll(st, done) {  // every shard, in parallel; done() once all are in
  var left = st.info.shards;
  status(st, "loading " + st.info.rows.toLocaleString() + " rows…");
  for (var s = 0; s < st.info.shards; s++) loadShard(st, s, function () { if (--left === 0) { st.complete = true; done(); } });
}

function allRows(st) {
  var out = [];
  for (var s = 0; s < st.info.shards; s++) if (st.shards[s]) out = out.concat(st.shards[s]);
  return out;
}

function status(st, text) { document.getElementById("status-" + st.idx).textContent = text; }

function matches(row, q) {
  var lists = [row[3], row[4]];
  for (var i = 0; i < 2; i++) for (var j = 0; j < lists[i].length; j++)
    if (lists[i][j].toLowerCase().indexOf(q) >= 0) return true;
  return String(row[0]) === q || (row[5] || "").toLowerCase().indexOf(q) >= 0;
}

function key(row, col) {
  var v = col >= 100 ? (row[7] || [])[col - 100] : row[col];
  if (Array.isArray(v)) return v.join(" ").toLowerCase();
  return v === null || v === undefined ? -Infinity : v;
}

function refresh(st) {
  var rows = allRows(st);
  var q = st.q.trim().toLowerCase();
  if (q) rows = rows.filter(function (r) { return matches(r, q); });
  if (st.sort) {
    var c = st.sort[0], d = st.sort[1];
    rows.sort(function (a, b) {
      var x = key(a, c), y = key(b, c);
      return (x < y ? -1 : x > y ? 1 : a[0] - b[0]) * d;
    });
  }
  st.view = rows;
  render(st);
}

function chip(t, cls) {
  var s = document.createElement("span");
  s.className = "chip" + (cls ? " " + cls : "");
  s.textContent = t.replace(/\n/g, "⏎").replace(/ /g, "·") || "∅";
  return s;
}

function normCell(v) {  // a decoder-norm share: a bar of the whole and its value
  var s = document.createElement("span"), b = document.createElement("span"), t = document.createElement("span");
  s.className = "norm"; b.className = "nbar"; t.className = "nval";
  b.style.width = (v * 48).toFixed(1) + "px";
  t.textContent = v.toFixed(4);
  s.append(b, t);
  return s;
}

function render(st) {
  var tbody = document.querySelector("#table-" + st.idx + " tbody");
  var n = st.view.length, pages = Math.max(1, Math.ceil(n / PAGE_ROWS));
  st.page = Math.min(st.page, pages - 1);
  var frag = document.createDocumentFragment();
  st.view.slice(st.page * PAGE_ROWS, (st.page + 1) * PAGE_ROWS).forEach(function (r) {
    var tr = document.createElement("tr");
    var a = document.createElement("a");
    a.href = "latents/" + st.info.hook + "/" + r[0] + ".html";
    a.textContent = r[0];
    var cells = [a, r[1].toExponential(2), r[2].toPrecision(4), r[3], r[4]];
    if (st.info.explanations) cells.push(r[5] || "", r[6] === null ? "" : r[6].toFixed(2));
    (r[7] || []).forEach(function (v) { cells.push(normCell(v)); });
    cells.forEach(function (v, i) {
      var td = document.createElement("td");
      if (i === 3 || i === 4) { td.className = "l"; v.forEach(function (t) { td.appendChild(chip(t, i === 4 ? "pos" : "")); }); }
      else if (i === 5 && st.info.explanations) { td.className = "l expl-cell"; td.textContent = v; }
      else if (v instanceof Node) td.appendChild(v);
      else td.textContent = v;
      tr.appendChild(td);
    });
    frag.appendChild(tr);
  });
  tbody.replaceChildren(frag);
  var pager = document.getElementById("pager-" + st.idx);
  pager.replaceChildren();
  if (pages > 1 || !st.complete) {
    var prev = document.createElement("button"), next = document.createElement("button"), lab = document.createElement("span");
    prev.textContent = "‹ prev"; next.textContent = "next ›";
    prev.disabled = st.page === 0;
    next.disabled = st.complete && st.page >= pages - 1;
    prev.onclick = function () { st.page--; render(st); };
    next.onclick = function () { withAll(st, function () { st.page++; render(st); }); };
    lab.className = "muted small";
    lab.textContent = "page " + (st.page + 1) + " of " + (st.complete ? pages : "…");
    pager.append(prev, lab, next);
  }
  var total = st.info.rows;
  status(st, (st.q ? n.toLocaleString() + " of " : "") + total.toLocaleString() + " latents with pages" +
         (st.complete || total <= n ? "" : " (first " + n.toLocaleString() + " loaded)"));
}

function withAll(st, then) { if (st.complete) then(); else loadAll(st, then); }

function go(hook) {  // "open latent id" box
  var v = document.getElementById("q-" + hook).value.trim(), id = parseInt(v, 10);
  var m = document.getElementById("msg-" + hook);
  if (PAGES[hook].indexOf(id) >= 0) location.href = "latents/" + hook + "/" + id + ".html";
  else m.textContent = "latent " + v + " has no page (dead, no examples, or beyond the page cap)";
  return false;
}

document.addEventListener("DOMContentLoaded", function () {
  HOOKS.forEach(function (info, i) {
    var st = stateFor(info.hook);
    if (!info.rows) { status(st, "no latent has a page"); return; }
    st.complete = info.shards === 1;
    document.querySelectorAll("#table-" + i + " th").forEach(function (th) {
      th.addEventListener("click", function () {
        var col = parseInt(th.dataset.col, 10);
        var dir = st.sort && st.sort[0] === col ? -st.sort[1] : (col === 0 || col >= 3 && col <= 5 ? 1 : -1);
        st.sort = [col, dir];
        document.querySelectorAll("#table-" + i + " th").forEach(function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(dir > 0 ? "asc" : "desc");
        withAll(st, function () { st.page = 0; refresh(st); });
      });
    });
    var timer = null;
    document.getElementById("filter-" + i).addEventListener("input", function (e) {
      clearTimeout(timer);
      timer = setTimeout(function () { st.q = e.target.value; st.page = 0; withAll(st, function () { refresh(st); }); }, 120);
    });
    loadShard(st, 0, function () { refresh(st); });
  });
});
