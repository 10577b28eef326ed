// HemaFlow web page: pick or drop an image, call /v1/predict?explain=true, show the answer.
// Everything stays in the browser and the server's memory; no third-party assets.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const dropzone = $("dropzone"), input = $("file-input"), preview = $("preview"), dropEmpty = $("drop-empty");
  const statusEl = $("status"), errorEl = $("error"), result = $("result");
  const camImage = $("cam-image"), camToggle = $("cam-toggle");
  let lastExplanation = null, previewUrl = null, busy = false;

  const pct = (p) => (p * 100).toFixed(p >= 0.995 || p <= 0.005 ? 0 : 1) + " %";
  const text = (el, value) => { el.textContent = value == null ? "" : String(value); };

  function showError(message) {
    errorEl.hidden = !message;
    text(errorEl, message || "");
  }

  async function loadModel() {
    try {
      const res = await fetch("/v1/model", { headers: apiHeaders() });
      if (!res.ok) throw new Error((await res.json()).detail || res.statusText);
      const m = await res.json();
      $("ready-dot").className = "dot ready";
      text($("model-text"), `${m.model.name} · version ${m.model.version} · data ${m.model.dataset_version}`);
    } catch (err) {
      $("ready-dot").className = "dot down";
      text($("model-text"), "No model loaded yet");
    }
  }

  function apiHeaders() {
    const key = $("api-key").value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  function setPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Preview of ${file.name}`;
    preview.hidden = false;
    dropEmpty.hidden = true;
  }

  async function analyse(file) {
    if (!file || busy) return;
    busy = true;
    showError("");
    setPreview(file);
    text(statusEl, `Analysing ${file.name}…`);
    dropzone.setAttribute("aria-busy", "true");
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      const res = await fetch("/v1/predict?explain=true", { method: "POST", body, headers: apiHeaders() });
      const data = await res.json().catch(() => ({ detail: res.statusText }));
      if (res.status === 401 || res.status === 403) $("apikey-row").hidden = false;
      if (!res.ok) throw new Error(data.detail || `request failed (${res.status})`);
      render(data);
      text(statusEl, `Analysed ${file.name}.`);
    } catch (err) {
      result.hidden = true;
      text(statusEl, "");
      showError(`Could not analyse this image: ${err.message}`);
    } finally {
      busy = false;
      dropzone.removeAttribute("aria-busy");
    }
  }

  function render(data) {
    // Refused as out of scope (in_scope false, no label): say so instead of showing a class.
    const refused = data.in_scope === false && data.label == null;
    $("answer").hidden = refused;
    $("out-of-scope").hidden = data.in_scope !== false;  // flagged but answered (refusal off): warn too
    text($("out-of-scope"), data.in_scope === false
      ? (data.scope_detail || "This image does not look like what the model was trained on") : "");
    if (refused) {
      lastExplanation = null;
      renderMeta(data);
      return;
    }
    const label = $("pred-label");
    text(label, data.label);
    label.classList.toggle("positive", data.positive_label != null && data.label === data.positive_label);
    text($("pred-conf"), pct(data.confidence));
    text($("threshold-note"), data.threshold != null
      ? `Decision rule: ${data.positive_label} when its probability ≥ ${(data.threshold * 100).toPrecision(2)} %.`
      : "");

    const bars = $("bars");
    bars.replaceChildren();
    const entries = Object.entries(data.probabilities);
    for (const [name, p] of entries) {
      const li = document.createElement("li");
      li.className = "bar-row" + (name === data.label ? " top" : "");
      li.dataset.label = name;
      const nm = document.createElement("span"); nm.className = "bar-name"; text(nm, name); nm.title = name;
      const track = document.createElement("span"); track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", `Probability of ${name}`);
      track.setAttribute("aria-valuemin", "0"); track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-valuenow", (p * 100).toFixed(1));
      const fill = document.createElement("span"); fill.className = "bar-fill";
      fill.style.width = Math.max(0, Math.min(100, p * 100)).toFixed(1) + "%";
      track.appendChild(fill);
      const val = document.createElement("span"); val.className = "bar-value"; text(val, pct(p));
      li.append(nm, track, val);
      bars.appendChild(li);
    }

    lastExplanation = data.explanation;
    showCam();

    const c = data.clinical, box = $("clinical");
    box.replaceChildren();
    const add = (cls, strong, body) => {
      if (!body) return;
      const p = document.createElement("p"); if (cls) p.className = cls;
      if (strong) { const b = document.createElement("strong"); text(b, strong + " "); p.appendChild(b); }
      p.appendChild(document.createTextNode(body));
      box.appendChild(p);
    };
    add("", c.title + ".", c.what);
    add("", "Normal share:", c.normal_share);
    add("", "An increase can mean:", c.increase);
    add("note", "", c.note);
    renderMeta(data);
  }

  function renderMeta(data) {
    text($("meta-model"), data.model.name);
    text($("meta-version"), data.model.version);
    text($("meta-dataset"), data.model.dataset_version);
    text($("meta-time"), `${data.processing_ms.toFixed(1)} ms`);
    result.hidden = false;
  }

  function showCam() {
    if (!lastExplanation) return;
    const overlay = camToggle.checked;
    camImage.src = "data:image/png;base64," + (overlay ? lastExplanation.overlay_png_base64 : lastExplanation.input_png_base64);
    camImage.alt = overlay
      ? `Grad-CAM heatmap for ${lastExplanation.label}: red areas weighed most in the prediction`
      : "The analysed image, resized as the model sees it";
    camImage.dataset.mode = overlay ? "overlay" : "input";
  }

  camToggle.addEventListener("change", showCam);
  input.addEventListener("change", () => { if (input.files.length) analyse(input.files[0]); input.value = ""; });
  dropzone.addEventListener("click", () => input.click());
  dropzone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => dropzone.addEventListener(t, (e) => {
    e.preventDefault(); dropzone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((t) => dropzone.addEventListener(t, (e) => {
    e.preventDefault(); dropzone.classList.remove("dragover");
  }));
  dropzone.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) analyse(file); else showError("Drop an image file.");
  });
  // A file dropped outside the zone must not make the browser navigate away.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  loadModel();
  setInterval(loadModel, 30000);
})();
