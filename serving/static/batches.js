// The review queue: /batches lists scored batches, /batches/<id> reviews one (keyboard first).
// Every API call sends the reviewer key (kept in this tab's sessionStorage only) as X-API-Key.
"use strict";
(() => {
  const KEY_STORE = "hemaflow-reviewer-key";
  const $ = (id) => document.getElementById(id);
  const state = { batch: null, index: 0, busy: false, urls: new Map() };

  const key = () => sessionStorage.getItem(KEY_STORE) || "";
  const status = (text, error = false) => { $("status").textContent = text; $("status").classList.toggle("error", error); };

  async function api(path, options = {}) {
    const headers = { "X-API-Key": key(), ...(options.headers || {}) };
    const resp = await fetch(path, { ...options, headers });
    if (resp.status === 401 || resp.status === 403) throw new Error("enter a reviewer key (the role's X-API-Key) above");
    if (!resp.ok) {
      let detail = resp.statusText;
      try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(detail);
    }
    return resp;
  }

  async function picture(path) {
    if (state.urls.has(path)) return state.urls.get(path);
    const resp = await api(path);
    const url = URL.createObjectURL(await resp.blob());
    state.urls.set(path, url);
    return url;
  }

  function imagePath(item, kind) {
    const b = state.batch;
    return `/v1/batches/${encodeURIComponent(b.batch_id)}/images/${item.sha256}/${kind}?version=${encodeURIComponent(b.model_version)}`;
  }

  function score(item) {
    const pos = state.batch.summary && state.batch.summary.positive_label;
    if (pos && state.batch.labels.length === 2 && pos in item.probabilities) return `P(${pos}) ${item.probabilities[pos].toFixed(2)}`;
    return `confidence ${item.confidence.toFixed(2)}`;
  }

  function reviewState(item) {
    if (!item.review) return ["to review", ""];
    return item.review.reviewed_label === item.review.predicted_label
      ? ["confirmed", "confirmed"] : [`→ ${item.review.reviewed_label}`, "corrected"];
  }

  // --- the list of batches ---------------------------------------------------------------
  async function showList() {
    $("list-view").hidden = false;
    const data = await (await api("/v1/batches")).json();
    $("dataset").textContent = data.dataset;
    $("who").textContent = `reviewing as ${data.reviewer}`;
    const rows = $("batch-rows");
    rows.replaceChildren();
    for (const b of data.batches) {
      const tr = document.createElement("tr");
      const link = document.createElement("a");
      link.href = `/batches/${encodeURIComponent(b.batch_id)}`;
      link.textContent = b.batch_id;
      const cells = [link, b.model_version, b.summary.n_images ?? "?", b.summary.n_refused ?? "?", b.reviewed];
      for (const c of cells) {
        const td = document.createElement("td");
        if (c instanceof Node) td.append(c); else td.textContent = String(c);
        tr.append(td);
      }
      rows.append(tr);
    }
    status(data.batches.length ? "" : "No scored batches yet.");
  }

  // --- one batch ---------------------------------------------------------------------------
  async function showBatch(batchId) {
    $("batch-view").hidden = false;
    const version = new URLSearchParams(location.search).get("version");
    const query = version ? `?version=${encodeURIComponent(version)}` : "";
    const batch = state.batch = await (await api(`/v1/batches/${encodeURIComponent(batchId)}${query}`)).json();
    $("dataset").textContent = batch.dataset;
    $("who").textContent = `reviewing as ${batch.reviewer}`;
    $("batch-title").textContent = `Batch ${batch.batch_id} · model version ${batch.model_version}`;
    renderQueue();
    renderRefused();
    const firstOpen = batch.items.findIndex((item) => !item.review);
    select(firstOpen >= 0 ? firstOpen : 0);
    status(batch.items.length ? "" : "This batch has no scored images.");
  }

  function renderQueue() {
    const queue = $("queue");
    queue.replaceChildren();
    const lazy = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) continue;
        lazy.unobserve(e.target);
        const item = state.batch.items[Number(e.target.dataset.index)];
        picture(imagePath(item, "thumbnail")).then((url) => { e.target.querySelector("img").src = url; }).catch(() => {});
      }
    }, { root: queue, rootMargin: "200px" });
    state.batch.items.forEach((item, i) => {
      const li = document.createElement("li");
      li.dataset.index = String(i);
      li.tabIndex = -1;
      const img = document.createElement("img");
      img.alt = "";
      const text = document.createElement("div");
      text.innerHTML = `<strong></strong><br><span class="muted small"></span>`;
      text.querySelector("strong").textContent = `${i + 1}. ${item.label}`;
      text.querySelector("span").textContent = score(item);
      const badge = document.createElement("span");
      badge.className = "state";
      li.append(img, text, badge);
      li.addEventListener("click", () => select(i));
      queue.append(li);
      lazy.observe(li);
      updateRow(i);
    });
    updateProgress();
  }

  function updateRow(i) {
    const li = $("queue").children[i];
    const [text, cls] = reviewState(state.batch.items[i]);
    const badge = li.querySelector(".state");
    badge.textContent = text;
    badge.className = `state ${cls}`;
    li.dataset.state = cls || "open";
  }

  function updateProgress() {
    const done = state.batch.items.filter((item) => item.review).length;
    $("progress").textContent = `${done} / ${state.batch.items.length} reviewed`;
  }

  function renderRefused() {
    const refused = state.batch.refused;
    $("refused-box").hidden = !refused.length;
    $("refused-count").textContent = String(refused.length);
    $("refused").replaceChildren(...refused.map((r) => {
      const li = document.createElement("li");
      li.textContent = `${r.key}: ${r.error}`;
      return li;
    }));
  }

  function select(i) {
    const items = state.batch.items;
    if (!items.length) return;
    state.index = Math.max(0, Math.min(items.length - 1, i));
    const item = items[state.index];
    for (const li of $("queue").children) li.classList.toggle("current", Number(li.dataset.index) === state.index);
    const li = $("queue").children[state.index];
    li.setAttribute("aria-current", "true");
    li.scrollIntoView({ block: "nearest" });
    $("d-label").textContent = `${state.index + 1}. predicted ${item.label}`;
    $("d-conf").textContent = score(item);
    $("d-key").textContent = item.key;
    const [text] = reviewState(item);
    $("d-review").textContent = item.review ? `Reviewed by ${item.review.reviewer}: ${text}` : "Not reviewed yet.";
    for (const [id, kind] of [["d-thumb", "thumbnail"], ["d-heat", "heatmap"]]) {
      const img = $(id);
      img.removeAttribute("src");
      picture(imagePath(item, kind)).then((url) => { if (state.index === items.indexOf(item)) img.src = url; })
        .catch(() => { img.alt = `no ${kind}`; });
    }
    renderActions(item);
  }

  function renderActions(item) {
    const box = $("actions");
    box.replaceChildren();
    const confirm = document.createElement("button");
    confirm.textContent = `Confirm ${item.label} (c)`;
    confirm.addEventListener("click", () => decide(item.label));
    box.append(confirm);
    state.batch.labels.forEach((label, n) => {
      const b = document.createElement("button");
      b.className = "secondary";
      b.dataset.label = label;
      b.textContent = `${n + 1} · ${label}`;
      b.addEventListener("click", () => decide(label));
      box.append(b);
    });
  }

  async function decide(label) {
    if (state.busy || !state.batch || !state.batch.items.length) return;
    state.busy = true;
    const i = state.index;
    const item = state.batch.items[i];
    try {
      const resp = await api(`/v1/batches/${encodeURIComponent(state.batch.batch_id)}/reviews`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sha256: item.sha256, reviewed_label: label, model_version: state.batch.model_version }),
      });
      item.review = await resp.json();
      updateRow(i);
      updateProgress();
      status(`Saved: ${item.key} → ${label}`);
      select(i + 1 < state.batch.items.length ? i + 1 : i);
    } catch (err) {
      status(`Not saved: ${err.message}`, true);
    } finally {
      state.busy = false;
    }
  }

  document.addEventListener("keydown", (event) => {
    if (!state.batch || event.target.closest("input, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
    const labels = state.batch.labels;
    if (event.key === "j") select(state.index + 1);
    else if (event.key === "k") select(state.index - 1);
    else if (event.key === "c" && state.batch.items.length) decide(state.batch.items[state.index].label);
    else if (/^[1-9]$/.test(event.key) && Number(event.key) <= labels.length) decide(labels[Number(event.key) - 1]);
    else return;
    event.preventDefault();
  });

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-input").blur();  // the queue's keys work at once
    route();
  });

  async function route() {
    $("list-view").hidden = $("batch-view").hidden = true;
    const match = location.pathname.match(/^\/batches\/([^/]+)\/?$/);
    try {
      if (!key()) throw new Error("enter a reviewer key (the role's X-API-Key) above");
      await (match ? showBatch(decodeURIComponent(match[1])) : showList());
    } catch (err) {
      status(err.message, true);
    }
  }

  route();
})();
