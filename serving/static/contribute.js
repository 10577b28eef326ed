// "Contribute this image with this label": offered only to a reviewer (a reviewer key entered on
// /batches in this tab), unticked for every new image; nothing is stored unless they tick and send.
"use strict";
(() => {
  const KEY_STORE = "hemaflow-reviewer-key";  // the review queue's (batches.js) per-tab key
  const $ = (id) => document.getElementById(id);
  const box = $("contribute"), optIn = $("contribute-opt-in"), select = $("contribute-label"), send = $("contribute-send");
  let file = null;

  const key = () => sessionStorage.getItem(KEY_STORE) || "";
  const say = (text) => { $("contribute-status").textContent = text; };

  // Capture phase: app.js clears the file input in its own change handler.
  document.addEventListener("change", (e) => { if (e.target.id === "file-input" && e.target.files.length) file = e.target.files[0]; }, true);
  document.addEventListener("drop", (e) => { const f = e.dataTransfer && e.dataTransfer.files[0]; if (f) file = f; }, true);

  async function labels() {
    if (select.options.length) return;
    const model = await (await fetch("/v1/model")).json();
    for (const label of model.labels) select.append(new Option(label, label));
  }

  async function offer() {
    if ($("result").hidden || !key() || !file) { box.hidden = true; return; }
    await labels();
    optIn.checked = false;
    select.disabled = send.disabled = true;
    select.value = $("pred-label").textContent;
    say("");
    box.hidden = false;
  }

  optIn.addEventListener("change", () => { select.disabled = send.disabled = !optIn.checked; });
  send.addEventListener("click", async () => {
    if (!optIn.checked || !file) return;
    send.disabled = true;
    const body = new FormData();
    body.append("file", file);
    const query = new URLSearchParams({ label: select.value, predicted_label: $("pred-label").textContent });
    try {
      const resp = await fetch(`/v1/contributions?${query}`, { method: "POST", body, headers: { "X-API-Key": key() } });
      const data = await resp.json();
      if (!resp.ok) throw new Error(data.detail || resp.statusText);
      say(`Contributed as ${data.reviewed_label} (review ${data.review_id.slice(0, 8)}); it joins the training data at the next feedback run.`);
      optIn.checked = false;
      select.disabled = true;
    } catch (err) {
      say(`Not contributed: ${err.message}`);
      send.disabled = false;
    }
  });
  new MutationObserver(offer).observe($("result"), { attributes: true, attributeFilter: ["hidden"] });
  new MutationObserver(offer).observe($("pred-label"), { childList: true });
})();
