"""The page at ``/``: drop an image, type a key or (for an image-text model) a text, see the neighbours as
thumbnails with captions and scores.

One self-contained document (no external scripts, fonts or styles: the service may run where nothing else
is reachable). It calls the same routes as any client, by relative urls, so it works under a mount prefix.
Text from the index (keys, captions) and the typed query are put in with ``textContent``, never as HTML.
``/?index=NAME&key=KEY&k=N`` (or ``&text=TEXT``) runs that search on load (links to a result, and the browser
tests). The text box is enabled for an index whose model has a text tower (``GET /indexes``: ``texts``).
"""
from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedpipe search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin-bottom: 1rem; }
input[type=text] { width: 18rem; } input[type=number] { width: 4rem; }
#drop { border: 2px dashed #999; padding: 1rem; margin-bottom: 1rem; text-align: center; color: #666; cursor: pointer; }
#drop.over { border-color: #2a6; color: #2a6; }
#error { color: #b00; margin-bottom: 1rem; white-space: pre-wrap; }
#results { display: flex; gap: .75rem; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; width: 160px; text-align: center; }
figure img { max-width: 160px; max-height: 160px; border: 1px solid #ccc; background: #fff; }
figure.query img { border: 3px solid #2a6; }
figcaption { font-size: .75rem; word-break: break-all; }
.text-query { width: 160px; min-height: 4rem; padding: .5rem; box-sizing: border-box; border: 3px solid #2a6;
              background: #fff; text-align: left; word-break: break-word; }
.caption { color: #555; font-style: italic; }
</style></head>
<body data-state="idle">
<h1>embedpipe search</h1>
<form id="form">
  <label>index <select id="index"></select></label>
  <label>key <input id="key" type="text" placeholder="an indexed key, e.g. 000123"></label>
  <label>text <input id="text" type="text" placeholder="a text, e.g. a red car" disabled></label>
  <label>k <input id="k" type="number" min="1" value="10"></label>
  <button type="submit">search</button>
</form>
<div id="drop">drop an image here, or click to choose one
  <input id="file" type="file" accept="image/*" hidden></div>
<div id="error"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

async function api(path, init) {
  const r = await fetch(path, init);
  let body;
  try { body = await r.json(); } catch (e) { body = {error: r.status + " " + r.statusText}; }
  if (!r.ok) throw new Error(body.error || (r.status + " " + r.statusText));
  return body;
}

function figure(src, lines, cls) {
  const f = document.createElement("figure");
  if (cls) f.className = cls;
  const img = document.createElement("img");
  img.alt = lines[0];
  if (src) img.src = src;
  f.appendChild(img);
  const cap = document.createElement("figcaption");
  lines.forEach((text, i) => {
    const line = document.createElement("div");
    if (i > 1) line.className = "caption";
    line.textContent = text;
    cap.appendChild(line);
  });
  f.appendChild(cap);
  return f;
}

function textFigure(text) {
  const f = document.createElement("figure");
  f.className = "query";
  const box = document.createElement("div");
  box.className = "text-query";
  box.textContent = text;
  f.appendChild(box);
  const cap = document.createElement("figcaption");
  cap.textContent = "text query";
  f.appendChild(cap);
  return f;
}

function show(answer, querySrc, queryName, isText) {
  // a key several shards hold is answered once per shard: one row each, the query named with its shard
  const out = $("results");
  out.replaceChildren();
  let hits = 0;
  for (const r of answer.results.length ? answer.results : [{results: []}]) {
    const name = answer.results.length > 1 && r.query_shard ? queryName + " (" + r.query_shard + ")" : queryName;
    out.appendChild(isText ? textFigure(queryName) : figure(r.thumb || querySrc, ["query: " + name], "query"));
    for (const h of r.results) {
      const lines = ["#" + h.rank + " " + h.key, "score " + h.score.toFixed(3)];
      if (h.caption) lines.push(h.caption);
      out.appendChild(figure(h.thumb, lines));
    }
    hits += r.results.length;
  }
  document.body.dataset.hits = String(hits);
  const imgs = Array.from(out.querySelectorAll("img"));
  Promise.all(imgs.map((im) => im.complete ? null : new Promise((ok) => { im.onload = im.onerror = ok; })))
    .then(() => { document.body.dataset.state = "done"; });
}

async function run(search) {
  $("error").textContent = "";
  document.body.dataset.state = "searching";
  try { await search(); } catch (e) { $("error").textContent = e.message; document.body.dataset.state = "error"; }
}

function byKey(key) {
  return run(async () => {
    const body = {index: $("index").value, k: Number($("k").value), keys: [key]};
    const answer = await api("search", {method: "POST", headers: {"content-type": "application/json"},
                                        body: JSON.stringify(body)});
    show(answer, null, key);
  });
}

function byText(text) {
  return run(async () => {
    const body = {index: $("index").value, k: Number($("k").value), texts: [text]};
    const answer = await api("search", {method: "POST", headers: {"content-type": "application/json"},
                                        body: JSON.stringify(body)});
    show(answer, null, text, true);
  });
}

function byImage(file) {
  return run(async () => {
    const form = new FormData();
    form.append("index", $("index").value);
    form.append("k", $("k").value);
    form.append("image", file, file.name);
    const answer = await api("search", {method: "POST", body: form});
    show(answer, URL.createObjectURL(file), file.name);
  });
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if ($("key").value.trim()) byKey($("key").value.trim());
  else if ($("text").value.trim()) byText($("text").value.trim());
});
const texts = {};  // index name -> its model has a text tower
function textBox() { $("text").disabled = !texts[$("index").value]; }
$("index").addEventListener("change", textBox);
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => { if ($("file").files.length) byImage($("file").files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) byImage(e.dataTransfer.files[0]);
});

run(async () => {
  const listed = await api("indexes");
  for (const ix of listed.indexes) {
    const o = document.createElement("option");
    o.value = ix.name;
    o.textContent = ix.name + " (" + ix.count + " vectors, " + (ix.model || "no model") + ")";
    $("index").appendChild(o);
    texts[ix.name] = Boolean(ix.texts);
  }
  if (params.get("index")) $("index").value = params.get("index");
  if (params.get("k")) $("k").value = params.get("k");
  textBox();
  document.body.dataset.state = "ready";
  if (params.get("key")) { $("key").value = params.get("key"); await byKey(params.get("key")); }
  else if (params.get("text")) { $("text").value = params.get("text"); await byText(params.get("text")); }
});
</script>
</body></html>
"""
