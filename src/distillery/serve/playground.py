"""The one-page playground served at ``GET /``: a prompt box, the answer, which model answered, its
confidence and the threshold. No external assets; inline here so it ships inside the package
without package-data settings."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>distillery playground</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  textarea { width: 100%; min-height: 6rem; font: inherit; box-sizing: border-box; }
  label { margin-right: 1rem; }
  #answer { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 4px; padding: .75rem; min-height: 3rem; }
  table { border-collapse: collapse; margin-top: .75rem; }
  td { padding: .15rem .8rem .15rem 0; }
  td:first-child { color: #666; }
  .err { color: #b00020; }
  button { font: inherit; padding: .3rem 1.2rem; }
</style>
</head>
<body>
<h1>distillery playground</h1>
<p>
  <label>model <select id="model"></select></label>
  <label>max tokens <input id="max_tokens" type="number" value="64" min="1" style="width:5rem"></label>
  <label>API key <input id="key" type="password" placeholder="if the server needs one"></label>
</p>
<textarea id="prompt" placeholder="Ask something">What is the capital of France?</textarea>
<p><button id="send">Send</button> <span id="status"></span></p>
<div id="answer"></div>
<table>
  <tr><td>answered by</td><td id="routed_to">-</td></tr>
  <tr><td>confidence</td><td id="confidence">-</td></tr>
  <tr><td>threshold</td><td id="threshold">-</td></tr>
</table>
<script>
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
function fmt(x) { return (x === null || x === undefined) ? "-" : (typeof x === "number" ? x.toFixed(4) : String(x)); }
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) {
    $("status").textContent = body.error ? body.error.message : r.statusText;
    $("status").className = "err";
    return;
  }
  $("model").innerHTML = "";
  // The router first: it is what the page is for.
  body.data.sort((a, b) => (b.router ? 1 : 0) - (a.router ? 1 : 0));
  for (const m of body.data) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    $("model").appendChild(o);
  }
  $("status").textContent = ""; $("status").className = "";
}
async function send() {
  $("status").textContent = "thinking..."; $("status").className = "";
  $("answer").textContent = "";
  for (const id of ["routed_to", "confidence", "threshold"]) $(id).textContent = "-";
  const req = {model: $("model").value, messages: [{role: "user", content: $("prompt").value}],
               max_tokens: parseInt($("max_tokens").value, 10) || 64, temperature: 0};
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(req)});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("answer").textContent = body.choices[0].message.content;
    const d = body.distillery || {};
    $("routed_to").textContent = d.routed_to || r.headers.get("x-distillery-model") || body.model;
    $("confidence").textContent = fmt(d.confidence);
    $("threshold").textContent = fmt(d.threshold);
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = e.message; $("status").className = "err";
  }
}
$("send").addEventListener("click", send);
$("key").addEventListener("change", loadModels);
loadModels();
</script>
</body>
</html>
"""
